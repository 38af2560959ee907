"""The PeakNet job: train EoMT on peak masks, predict peak lists (CXI/CSV), evaluate against truth."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.apps.compose import compose
from vitkit.apps.peaks.finder import MODEL_CONFIG_KEY, PeakFinder, load_model
from vitkit.atomic import write_json, write_text
from vitkit.errors import ConfigError
from vitkit.weights.io import read_json

__all__ = ["compose", "train", "predict", "evaluate", "truth_of", "load_model", "PeakFinder",
           "format_metrics", "write_json", "event_of", "MODEL_CONFIG_KEY"]

# ---------------------------------------------------------------------------------------- config
def build_strategy(strategy: Any, options: dict | None = None):
    """``"fsdp"`` -> :class:`FSDP2Strategy` (FSDP2 units on vitkit's Block, sharded checkpoints; CPU
    and GPU) with ``options``; any other Lightning strategy name passes through unchanged."""
    if strategy == "fsdp":
        from vitkit.tasks.train.distributed import FSDP2Strategy

        return FSDP2Strategy(**(options or {}))
    if options:
        raise ValueError(f"strategy_options {sorted(options)} are only for strategy=fsdp, not {strategy!r}")
    return strategy


# ---------------------------------------------------------------------------------------- predict
def event_of(item) -> np.ndarray:
    """The raw float32 event ``[P, H, W]`` of a source item: a dict with ``image`` or an array; a single frame
    ``[H, W]`` (or ``[1, H, W]``) is a one-panel event."""
    img = item["image"] if isinstance(item, dict) else item
    img = np.asarray(img.numpy() if torch.is_tensor(img) else img, dtype=np.float32)
    if img.ndim == 4 and img.shape[1] == 1:  # panels with a channel axis [P, 1, H, W]
        img = img[:, 0]
    return img[None] if img.ndim == 2 else img


def predict(finder, events, out: Path, overlays: int = 2, write_frames: bool = False, progress: bool = True,
            truth: list | None = None, keep_masks: bool = False, event_ids=None) -> dict[str, Any]:
    """Find peaks in ``events`` (an indexable of raw events ``[P, H, W]``, frames ``[H, W]`` or source items)
    with a :class:`~vitkit.apps.peaks.finder.PeakFinder` and write ``peaks.cxi`` (slab coordinates), ``peaks.csv``
    (panel, slab and lab coordinates), the ``detector.geom`` that maps them and overlay PNGs to ``out``.

    Everything is computed before anything is written: a bad event raises and leaves no output behind.
    Returns ``{"peaks": [table per event], "masks": [[P, H, W] bool per event] or None}``.
    """
    from tqdm.auto import tqdm

    from vitkit.apps.peaks.io import save_overlay_png, write_csv, write_cxi

    det = finder.detector
    tables, masks = [], [] if keep_masks else None
    shown = []
    for i in tqdm(range(len(events)), desc="predict", unit="event", disable=not progress):
        item = events[i]
        ev = event_of(item)[None]
        good = item.get("good") if isinstance(item, dict) else None  # simulated shots carry their own mask
        good = None if good is None else event_of(good).astype(bool)
        m, t = finder.find(ev, good)
        tables.extend(t)
        if keep_masks:
            masks.append(m[0])
        if i < overlays:
            shown.append(ev[0])
    out.mkdir(parents=True, exist_ok=True)
    slabs = None
    if write_frames:
        slabs = _SlabView(events, det)
    write_cxi(out / "peaks.cxi", tables, frames=slabs, max_peaks=finder.max_peaks or 2048, event_ids=event_ids)
    write_csv(out / "peaks.csv", tables)
    if det is not None:
        from vitkit.apps.peaks.geom import write_geom

        write_geom(det, out / "detector.geom")
    for i, ev in enumerate(shown):
        if det is not None and len(det) > 1:
            from vitkit.apps.peaks.draw import draw_detector

            t = tables[i]
            draw_detector(det, out / f"overlay_{i:04d}.png", image=ev, peaks=np.stack([t["x_lab"], t["y_lab"]], 1))
        else:
            true = None if truth is None else truth[i][0]
            save_overlay_png(out / f"overlay_{i:04d}.png", ev[0], tables[i], true_peaks=true)
    return {"peaks": tables, "masks": masks}


class _SlabView:
    """Events of a source as CrystFEL slabs ``[SS, FS]`` (read when written)."""

    def __init__(self, events, detector):
        self.events, self.detector = events, detector

    def __len__(self) -> int:
        return len(self.events)

    def __getitem__(self, i: int) -> np.ndarray:
        ev = event_of(self.events[i])
        return ev[0] if self.detector is None else self.detector.to_slab(ev)


def evaluate(pred_masks, pred_peaks, true_masks, true_peaks, radius: float = 2.0, weak=None) -> dict[str, float]:
    """Pixel IoU/Dice and peak precision/recall/F1/centroid RMSE, panel by panel.

    ``pred_masks`` / ``true_masks``: per event ``[P, H, W]`` (or per frame ``[H, W]``); ``pred_peaks``: per
    event a peak table (or ``[n, 2+]`` rows ``(y, x, ...)``); ``true_peaks``: per event a list of ``[n, 2+]``
    ``(ss, fs, ...)`` arrays, one per panel (or per frame one array); ``weak``: like ``true_peaks``, the
    don't-care reflections (a prediction on one is neither a true nor a false positive), or None.
    """
    from vitkit.apps.peaks.metrics import peak_metrics, pixel_metrics
    from vitkit.apps.peaks.peakfind import as_peak_table

    pm, tm, pp, tp, ig = [], [], [], [], []
    weak = [None] * len(true_peaks) if weak is None else weak
    for m_pred, m_true, t_pred, t_true, w in zip(pred_masks, true_masks, pred_peaks, true_peaks, weak):
        m_pred, m_true = np.asarray(m_pred), np.asarray(m_true)
        if m_pred.ndim == 2:
            m_pred, m_true, t_true, w = m_pred[None], m_true[None], [t_true], None if w is None else [w]
        t_pred = as_peak_table(t_pred)
        for k in range(m_pred.shape[0]):
            pm.append(m_pred[k])
            tm.append(m_true[k] > 0)
            sel = t_pred[t_pred["panel"] == k]
            pp.append(np.stack([sel["ss"], sel["fs"]], 1))
            tp.append(_rows(t_true[k]))
            ig.append(np.zeros((0, 2)) if w is None else _rows(w[k]))
    result = dict(pixel_metrics(pm, tm))
    result.update(peak_metrics(pp, tp, radius=radius, ignore_list=ig))
    return result


def _rows(a) -> np.ndarray:
    a = np.asarray(a.numpy() if torch.is_tensor(a) else a, dtype=np.float64)
    return a.reshape(-1, a.shape[-1] if a.ndim == 2 else 2)[:, :2]


def truth_of(source) -> tuple[list[np.ndarray], list[list[np.ndarray]], list | None]:
    """True masks (per event ``[P, H, W]``), peak lists (per event, one ``[n, 2+]`` ``(ss, fs, ...)`` array per
    panel) and weak (don't-care) reflections (like the peaks; None when the source has none) of a labelled
    source: simulated items carry their peaks; labelled files get peaks from their label components."""
    from vitkit.apps.peaks.peakfind import find_peaks

    def panels(p):
        return [_rows(q) for q in p] if isinstance(p, (list, tuple)) else [_rows(p)]

    masks, peaks, weak = [], [], []
    for i in range(len(source)):
        item = source[i]
        if not isinstance(item, dict) and getattr(source, "has_labels", False):
            item = {"image": item, "label": source.label(i)}
        if not isinstance(item, dict) or item.get("label") is None:
            raise ValueError("evaluation needs labelled frames (zarr 'labels' or simulated frames)")
        lab = np.asarray(item["label"]) > 0
        lab = lab[None] if lab.ndim == 2 else lab
        masks.append(lab)
        p = item.get("peaks")
        if p is None:
            ev = event_of(item)
            peaks.append([find_peaks(lab[k], ev[k]) for k in range(len(lab))])
        else:
            peaks.append(panels(p))
        weak.append(None if item.get("weak") is None else panels(item["weak"]))
    return masks, peaks, (weak if any(w is not None for w in weak) else None)


def format_metrics(m: dict[str, float]) -> str:
    keys = ["peak_precision", "peak_recall", "peak_f1", "centroid_rmse_px", "pixel_iou", "pixel_dice"]
    return "\n".join(f"  {k:<18} {m[k]:.4f}" for k in keys if k in m)


# ------------------------------------------------------------------------------------------ train
def train(cfg) -> Path:
    """Train with a composed config, then predict and evaluate the held-out frames. Returns the run dir."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vitkit.apps.peaks.curves import plot_curves
    from vitkit.apps.peaks.datamodule import PeakDataModule
    from vitkit.tasks.train import SegmentationModule

    run_dir, resume_ckpt = _run_dir(cfg)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = instantiate(model_cfg)
    module = SegmentationModule(model, **OmegaConf.to_container(cfg.module, resolve=True))
    data = PeakDataModule(**OmegaConf.to_container(cfg.data, resolve=True))
    if data.detector is not None:  # the geometry the model was trained on travels with the run
        from vitkit.apps.peaks.geom import write_geom

        write_geom(data.detector, run_dir / "detector.geom")
    trainer = _trainer(cfg, run_dir, model_cfg)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):  # gather the shards (collective), continue with a plain model
        from vitkit.tasks.train.distributed import full_state_dict

        state = full_state_dict(model)
        if trainer.is_global_zero:
            model = instantiate({**model_cfg, "pretrained": False})
            model.load_state_dict(state, strict=True)
    try:
        if trainer.is_global_zero:
            plot_curves(run_dir / "logs" / "metrics.csv", run_dir / "curves.png")
            model.eval()
            _fit_sparse(cfg, model, data, run_dir)
            model.save_pretrained(run_dir / "model")
            test = data.frames("test")
            if test is not None:
                _evaluate_held_out(cfg.predict, cfg.sparse.max_f1_drop, model, data.detector, test, run_dir)
    finally:
        _leave_together()
    return run_dir


def _leave_together() -> None:
    """Distributed runs: every rank waits here until rank 0 has written the model and the held-out results, then
    the process group ends. A rank that left while rank 0 was still predicting was seen to abort in gloo's
    teardown ("terminate called without an active exception"), and the launcher then killed rank 0 mid-predict."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _fit_sparse(cfg, model, data, run_dir: Path) -> None:
    """Sparse-token inference for the run (``cfg.sparse``, :mod:`vitkit.apps.peaks.sparse`): the spot-evidence
    threshold on the calibration split, then a copy of the trained model fine-tuned through the sparse path
    (``sparse_model/``; ``sparse.json`` has both's statistics). Nothing when ``sparse.fit`` is off or there is no
    calibration data (then ``predict.sparse`` is refused)."""
    from omegaconf import OmegaConf

    from vitkit.apps.peaks.sparse import fine_tune_sparse, fit_threshold

    s, p = cfg.sparse, cfg.predict
    calib = data.frames("calib") if s.fit else None
    if calib is None:
        return
    finder = PeakFinder(model, data.detector, overlap=p.overlap, min_pixels=p.min_pixels, threshold=p.threshold,
                        min_snr=p.min_snr)
    try:
        stats = fit_threshold(finder, calib, recall=s.recall)
    except ConfigError as e:  # the trained model is still saved; it cannot predict sparsely
        print(f"no sparse-token model: {e}")
        return
    tuned, info = fine_tune_sparse(model, data.train_dataloader(), stats["threshold"], steps=s.steps, lr=s.lr,
                                   loss=OmegaConf.to_container(cfg.module.loss, resolve=True))
    tuned.save_pretrained(run_dir / "sparse_model")
    stats.update(calibration_shots=len(calib), fine_tune=info)
    write_json(run_dir / "sparse.json", stats)
    print(f"sparse-token model: the threshold keeps {stats['kept_fraction']:.3f} of the calibration shots' tokens "
          f"and {stats['recall']:.3f} of their peak tokens; fine-tuned {info['steps']} steps in "
          f"{info['seconds']:.0f} s")


def _run_dir(cfg) -> tuple[Path, Path | None]:
    """``(run directory, checkpoint to resume from or None)``: a new run (``run_dir`` or ``runs/<time>``), or the
    run of ``resume`` (a run directory or a checkpoint file)."""
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
    return run_dir, resume_ckpt


def _trainer(cfg, run_dir: Path, model_cfg: dict):
    """The Lightning trainer of a run: its strategy, checkpoints (best and last, written atomically through
    :class:`~vitkit.tasks.train.checkpoint.AtomicCheckpointIO`, carrying the model config and every rank's RNG
    states), progress bar, learning-rate log and CSV log."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger
    from omegaconf import OmegaConf

    from vitkit.tasks.train.checkpoint import AtomicCheckpointIO, RunProvenance

    trainer_kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    options = trainer_kw.pop("strategy_options", None)
    trainer_kw["strategy"] = build_strategy(trainer_kw.get("strategy", "auto"), options)
    callbacks = [
        RunProvenance({MODEL_CONFIG_KEY: model_cfg}),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/pixel_iou", mode="max",
                        save_last=True, save_on_train_epoch_end=True),
        TQDMProgressBar(refresh_rate=max(1, int(os.environ.get("VITKIT_PROGRESS_REFRESH", 1)))),
        LearningRateMonitor(logging_interval="step"),  # logs/metrics.csv: lr-AdamW/pg<i> per parameter group
    ]
    trainer = L.Trainer(default_root_dir=str(run_dir), logger=CSVLogger(str(run_dir), name="logs", version=""),
                        callbacks=callbacks, deterministic=True, plugins=[AtomicCheckpointIO()], **trainer_kw)
    # deterministic=True also fills the memory of every new tensor (fill_uninitialized_memory): ~18 % of a
    # training step's CPU time on the tiny model. vitkit reads no memory it has not written, so the results are
    # the same bit for bit without it (the exact-resume tests compare runs to the last bit).
    torch.utils.deterministic.fill_uninitialized_memory = False
    return trainer


def _evaluate_held_out(p, max_f1_drop: float, model, detector, test, run_dir: Path) -> None:
    """Predict the held-out frames with the trained model (``p``: the ``predict`` config) and, when the run has one,
    its sparse-token model; evaluate both against their truth. ``sparse.json`` records whether the sparse-token model
    held the accuracy (peak F1 at most ``max_f1_drop`` below the dense model's), which makes it the default of
    ``vitkit predict`` and the stream on a CPU (:func:`~vitkit.apps.peaks.finder.choose_sparse`). The run directory
    gets the predictions (``peaks.cxi``, ``peaks.csv``, overlays) of the model that default picks (or
    ``predict.sparse``'s: true or false), ``metrics.json`` its scores, ``model`` which one it is, and under
    ``"dense"``/``"sparse"`` the other model's scores."""
    import tempfile

    from vitkit.apps.peaks.finder import choose_sparse

    true_masks, true_peaks, weak = truth_of(test)
    kw = dict(overlap=p.overlap, min_pixels=p.min_pixels, min_snr=p.min_snr, min_peaks=p.min_peaks,
              max_peaks=p.max_peaks, threshold=p.threshold)
    finders = {"dense": PeakFinder(model, detector, **kw)}
    if (run_dir / "sparse_model").exists():
        finders["sparse"] = PeakFinder.from_run(run_dir, geometry=detector, sparse=True, **kw)
    elif p.sparse:
        raise ConfigError(f"predict.sparse: {run_dir} has no sparse-token model (sparse.fit off, or no calibration "
                          "shots)")
    scores = {}
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".held-out-") as tmp:
        for name, finder in finders.items():
            res = predict(finder, test, Path(tmp) / name, overlays=p.overlays, truth=true_peaks, keep_masks=True)
            scores[name] = evaluate(res["masks"], res["peaks"], true_masks, true_peaks, radius=p.radius, weak=weak)
            if finder.sparse:
                scores[name]["kept_token_fraction"] = finder.kept_token_fraction
        if "sparse" in scores:
            f1 = {n: float(m["peak_f1"]) for n, m in scores.items()}
            held = {"frames": len(test), "dense_peak_f1": f1["dense"], "sparse_peak_f1": f1["sparse"],
                    "max_f1_drop": max_f1_drop, "default": bool(f1["sparse"] >= f1["dense"] - max_f1_drop)}
            write_json(run_dir / "sparse.json", {**read_json(run_dir / "sparse.json"), "held_out": held})
        chosen, why = choose_sparse(run_dir, p.sparse)
        chosen = "sparse" if chosen else "dense"
        for f in (Path(tmp) / chosen).iterdir():
            os.replace(f, run_dir / f.name)
    metrics = dict(scores[chosen], model=chosen, num_frames=len(test))
    print(f"held-out frames, {why}:\n" + format_metrics(metrics))
    for name, m in scores.items():
        if name != chosen:
            metrics[name] = m
            print(f"  the {name} model (--{name}): peak F1 {m['peak_f1']:.4f}, pixel IoU {m['pixel_iou']:.4f}")
    write_json(run_dir / "metrics.json", metrics)
