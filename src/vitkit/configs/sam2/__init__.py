"""SAM2 model configs with vitkit trunks (a package so that Hydra can address it as pkg://vitkit.configs.sam2)."""
