"""The PeakNet job: train EoMT on peak masks, predict peak lists (CXI/CSV), evaluate against truth."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_CONFIG_KEY = "vitkit_model_config"


# ---------------------------------------------------------------------------------------- config
def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """The packaged Hydra config with command-line style overrides (``key=value``, ``group=option``).
    Another Hydra context that is open (e.g. sam2's, opened on import) is restored afterwards."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="vitkit.configs", version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    finally:
        restore_gh_from_backup(backup)


def build_strategy(strategy: Any, options: dict | None = None):
    """``"fsdp"`` -> :class:`FSDP2Strategy` (FSDP2 units on vitkit's Block, sharded checkpoints; CPU
    and GPU) with ``options``; any other Lightning strategy name passes through unchanged."""
    if strategy == "fsdp":
        from vitkit.tasks.train.distributed import FSDP2Strategy

        return FSDP2Strategy(**(options or {}))
    if options:
        raise ValueError(f"strategy_options {sorted(options)} are only for strategy=fsdp, not {strategy!r}")
    return strategy


# ----------------------------------------------------------------------------------------- model
def load_model(checkpoint: str | Path):
    """An EoMT from a training run: a run directory, a Lightning ``.ckpt`` or an exported model dir."""
    from hydra.utils import instantiate

    import vitkit

    path = Path(checkpoint)
    if path.is_dir() and (path / "model" / "config.json").exists():
        return vitkit.from_pretrained(path / "model")
    if path.is_dir() and (path / "config.json").exists():
        return vitkit.from_pretrained(path)
    from vitkit.tasks.train.distributed import is_sharded_checkpoint, load_full_state_dict

    if path.is_dir() and not is_sharded_checkpoint(path):
        path = path / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: pass a run directory, a .ckpt file or a "
                                f"model directory written by vitkit")
    if is_sharded_checkpoint(path):  # FSDP: a directory of shards
        ckpt = load_full_state_dict(path)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if MODEL_CONFIG_KEY not in ckpt:
        raise vitkit.CheckpointError(f"{path} was not written by `vitkit train` (no {MODEL_CONFIG_KEY})")
    cfg = dict(ckpt[MODEL_CONFIG_KEY])
    cfg["pretrained"] = False  # the checkpoint carries the trained weights
    model = instantiate(cfg)
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------- predict
@torch.no_grad()
def predict_masks(model, frames, overlap: float = 0.25, progress: bool = True, device: str | torch.device = "cpu"):
    """Peak masks for raw frames (any size; sliding windows at native resolution) on ``device``.

    Yields ``(raw frame [H, W] float32, mask [H, W] bool)`` per frame, in order.
    """
    from tqdm.auto import tqdm

    from vitkit.tasks.postprocess import semantic_inference
    from vitkit.tasks.transforms import instance_normalise

    model.eval()
    for i in tqdm(range(len(frames)), desc="predict", unit="frame", disable=not progress):
        raw = frame_image(frames[i])
        x = instance_normalise(torch.tensor(raw, dtype=torch.float32)[None, None]).to(device)  # copies (read-only ok)
        probs = semantic_inference(model, x, overlap=overlap)
        yield raw, (probs.argmax(1)[0] == 1).cpu().numpy()


def frame_image(item) -> np.ndarray:
    """The raw [H, W] float32 frame of a source item (dict with ``image`` or an array)."""
    img = item["image"] if isinstance(item, dict) else item
    img = np.asarray(img.numpy() if torch.is_tensor(img) else img, dtype=np.float32)
    return img[0] if img.ndim == 3 else img


def predict(model, frames, out: Path, overlap: float = 0.25, min_peaks: int = 0, max_peaks: int = 2048,
            min_pixels: int = 1, overlays: int = 2, write_frames: bool = False, progress: bool = True,
            truth: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Run peak finding over ``frames`` and write ``peaks.cxi``, ``peaks.csv`` and overlay PNGs to ``out``."""
    from vitkit.apps.peaks.io import save_overlay_png, write_csv, write_cxi
    from vitkit.apps.peaks.peakfind import peaks_per_frame

    out.mkdir(parents=True, exist_ok=True)
    raws, masks = [], []
    for raw, mask in predict_masks(model, frames, overlap, progress):
        raws.append(raw)
        masks.append(mask)
    # 8-connected components, intensity-weighted centroids and sums on the raw frames, count filters
    peaks = peaks_per_frame(masks, raws, min_peaks=min_peaks, max_peaks=max_peaks, min_pixels=min_pixels)
    write_cxi(out / "peaks.cxi", peaks, frames=raws if write_frames else None, max_peaks=max_peaks)
    write_csv(out / "peaks.csv", peaks)
    for i in range(min(overlays, len(frames))):
        save_overlay_png(out / f"overlay_{i:04d}.png", raws[i], peaks[i],
                         true_peaks=None if truth is None else truth[i])
    return {"masks": masks, "peaks": peaks}


def evaluate(pred_masks, pred_peaks, true_masks, true_peaks, radius: float = 2.0) -> dict[str, float]:
    """Pixel IoU/Dice and peak precision/recall/F1/centroid RMSE."""
    from vitkit.apps.peaks.metrics import peak_metrics, pixel_metrics

    result = dict(pixel_metrics(pred_masks, true_masks))
    result.update(peak_metrics([p[:, :2] for p in pred_peaks], [t[:, :2] for t in true_peaks], radius=radius))
    return result


def truth_of(frames) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """True masks and peak lists of a labelled source (synthetic frames carry their peak list; labelled
    files get peaks from their label components)."""
    from vitkit.apps.peaks.peakfind import find_peaks

    masks, peaks = [], []
    for i in range(len(frames)):
        item = frames[i]
        if not isinstance(item, dict) and getattr(frames, "has_labels", False):
            item = {"image": item, "label": frames.label(i)}
        if not isinstance(item, dict) or item.get("label") is None:
            raise ValueError("evaluation needs labelled frames (zarr 'labels' or synthetic frames)")
        lab = np.asarray(item["label"]) > 0
        masks.append(lab)
        p = item.get("peaks")
        peaks.append(np.asarray(p, dtype=np.float32) if p is not None else find_peaks(lab, frame_image(item)))
    return masks, peaks


def format_metrics(m: dict[str, float]) -> str:
    keys = ["peak_precision", "peak_recall", "peak_f1", "centroid_rmse_px", "pixel_iou", "pixel_dice"]
    return "\n".join(f"  {k:<18} {m[k]:.4f}" for k in keys if k in m)


# ------------------------------------------------------------------------------------------ train
def train(cfg) -> Path:
    """Train with a composed config, then predict and evaluate the held-out frames. Returns the run dir."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger
    from omegaconf import OmegaConf

    from vitkit.apps.peaks.curves import plot_curves
    from vitkit.apps.peaks.datamodule import PeakDataModule
    from vitkit.tasks.train import SegmentationModule

    resume_ckpt = None
    if cfg.resume:
        resume = Path(cfg.resume)
        resume_ckpt = resume / "checkpoints" / "last.ckpt" if resume.is_dir() else resume
        if not resume_ckpt.exists():
            raise FileNotFoundError(f"cannot resume: {resume_ckpt} does not exist")
        run_dir = resume_ckpt.parent.parent if resume.is_dir() or resume_ckpt.parent.name == "checkpoints" \
            else resume_ckpt.parent
    else:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = instantiate(model_cfg)
    module = SegmentationModule(model, **OmegaConf.to_container(cfg.module, resolve=True))
    data = PeakDataModule(**OmegaConf.to_container(cfg.data, resolve=True))

    class Provenance(Callback):
        """Store the model config and every rank's RNG states in each checkpoint (exact resume; ranks
        draw different amounts of randomness, e.g. the loss's point sampling depends on the data)."""

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint[MODEL_CONFIG_KEY] = model_cfg
            state = {"torch": torch.get_rng_state(),
                     "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
            states = [state]
            if trainer.world_size > 1:  # collective: every rank saves (rank 0 writes the metadata)
                states = [None] * trainer.world_size
                torch.distributed.all_gather_object(states, state)
            checkpoint["vitkit_rng"] = states

        def on_load_checkpoint(self, trainer, pl_module, checkpoint):
            states = checkpoint.get("vitkit_rng")
            if not states:
                return
            if len(states) != trainer.world_size:
                import warnings

                warnings.warn(f"checkpoint has RNG states of {len(states)} ranks, resuming on "
                              f"{trainer.world_size}: the run continues but is not bit-identical", stacklevel=1)
            rng = states[trainer.global_rank % len(states)]
            torch.set_rng_state(rng["torch"])
            state = list(np.random.get_state())
            state[1] = rng["numpy"].numpy().astype(np.uint32)
            np.random.set_state(tuple(state))

    class AtomicCheckpoint(ModelCheckpoint):
        """Checkpoints are written to a temporary file and renamed: a kill never leaves half a file."""

        def _save_checkpoint(self, trainer, filepath):
            tmp = f"{filepath}.tmp"
            trainer.save_checkpoint(tmp, self.save_weights_only)  # collective; ends with a barrier
            if trainer.is_global_zero:
                if os.path.isdir(tmp):  # sharded: swap whole directories
                    old = f"{filepath}.old"
                    if os.path.exists(filepath):
                        os.replace(filepath, old)
                    os.replace(tmp, filepath)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, filepath)
            trainer.strategy.barrier("vitkit.AtomicCheckpoint")
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath

    trainer_kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    options = trainer_kw.pop("strategy_options", None)
    trainer_kw["strategy"] = build_strategy(trainer_kw.get("strategy", "auto"), options)
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        Provenance(),
        AtomicCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/pixel_iou", mode="max", save_last=True,
                         save_on_train_epoch_end=True),
        TQDMProgressBar(refresh_rate=max(1, int(os.environ.get("VITKIT_PROGRESS_REFRESH", 1)))),
    ]
    trainer = L.Trainer(default_root_dir=str(run_dir), logger=CSVLogger(str(run_dir), name="logs", version=""),
                        callbacks=callbacks, deterministic=True, **trainer_kw)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):  # gather the shards (collective), continue with a plain model
        from vitkit.tasks.train.distributed import full_state_dict

        state = full_state_dict(model)
        if trainer.is_global_zero:
            model = instantiate({**model_cfg, "pretrained": False})
            model.load_state_dict(state, strict=True)
    if not trainer.is_global_zero:
        return run_dir
    plot_curves(run_dir / "logs" / "metrics.csv", run_dir / "curves.png")
    model.eval()
    model.save_pretrained(run_dir / "model")

    test = data.frames("test")
    if test is not None:
        true_masks, true_peaks = truth_of(test)
        p = cfg.predict
        res = predict(model, test, run_dir, overlap=p.overlap, min_peaks=p.min_peaks, max_peaks=p.max_peaks,
                      min_pixels=p.min_pixels, overlays=p.overlays, truth=true_peaks)
        metrics = evaluate(res["masks"], res["peaks"], true_masks, true_peaks, radius=p.radius)
        metrics["num_frames"] = len(test)
        write_json(run_dir / "metrics.json", metrics)
        print("held-out frames:\n" + format_metrics(metrics))
    return run_dir


def write_json(path: Path, obj: dict) -> None:
    """Atomic JSON write."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
