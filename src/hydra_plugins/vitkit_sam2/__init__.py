"""Hydra plugin package of vitkit: makes vitkit's SAM2 model configs visible to ``sam2.build_sam.build_sam2``."""
