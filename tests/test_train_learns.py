"""`vitkit train` learns: a short run through the real training job finds held-out peaks far better than chance,
logs its learning rate, and the README's config groups compose (and train) through the same command.

The run (``learned_run`` in conftest.py, shared with test_predict_flags.py) is ``vitkit train`` on simulated single
frames (``data=synthetic``: 128 x 128 frames, 15-40 Bragg-like peaks each, shot and read noise, water ring, beam
stop, dead and hot pixels) with the default small EoMT (``model=eomt_tiny``), 160 optimizer steps on 32 x 32 crops,
then the job's own prediction and evaluation of the 6 held-out frames (``metrics.json``).

Chance level. A finder that does not look at the image places its guesses uniformly at random. A guess is a true
positive only if it falls within the matching radius (2 px) of a true peak, so its precision is at most the covered
fraction ``c`` of the frame (pixels within 2 px of a true peak) and its F1 = 2PR / (P + R) <= 2c / (1 + c), whatever
the number of guesses. On these frames ``c`` is about 1-3 %, so chance F1 is a few per cent. The test computes ``c``
on the held-out frames themselves, and also simulates the guesser that is even told the true number of peaks.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf


def _held_out(run: Path):
    """The run's held-out frames and their truth, rebuilt from its config.yaml as `vitkit evaluate` does."""
    from vitkit.apps.peaks.datamodule import make_source
    from vitkit.apps.peaks.job import truth_of

    data = OmegaConf.to_container(OmegaConf.load(run / "config.yaml").data, resolve=True)
    test = make_source("test", **{k: v for k, v in data.items() if k not in ("crop", "polar_crop_sigma")})
    masks, peaks, _ = truth_of(test)
    return test, masks, peaks


def chance_f1(masks, peaks, radius: float, draws: int = 20, seed: int = 0) -> tuple[float, float]:
    """``(bound, simulated)``: 2c/(1+c) with c the covered fraction, and the mean F1 of a guesser told the count."""
    from vitkit.apps.peaks.metrics import peak_metrics

    covered = total = 0
    frames = []
    for m, ps in zip(masks, peaks):
        for k, p in enumerate(ps):
            h, w = m[k].shape
            yy, xx = np.mgrid[:h, :w]
            near = np.zeros((h, w), dtype=bool)
            for y, x in np.asarray(p)[:, :2]:
                near |= (yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2
            covered, total = covered + near.sum(), total + near.size
            frames.append((h, w, np.asarray(p)[:, :2]))
    c = covered / total
    rng = np.random.default_rng(seed)
    f1s = []
    for _ in range(draws):
        guesses = [np.stack([rng.uniform(-0.5, h - 0.5, len(p)), rng.uniform(-0.5, w - 0.5, len(p))], 1)
                   for h, w, p in frames]
        f1s.append(peak_metrics(guesses, [p for *_, p in frames], radius=radius)["peak_f1"])
    return 2 * c / (1 + c), float(np.mean(f1s))


def test_held_out_peak_f1_is_far_above_chance(learned_run):
    m = json.loads((learned_run / "metrics.json").read_text())
    cfg = OmegaConf.load(learned_run / "config.yaml")
    assert m["num_frames"] == cfg.data.num_test == 6
    _, masks, peaks = _held_out(learned_run)
    n_true = sum(len(p) for ps in peaks for p in ps)
    assert m["n_true"] == n_true > 100  # the job scored every held-out peak
    bound, simulated = chance_f1(masks, peaks, cfg.predict.radius)
    assert simulated <= bound < 0.1, (simulated, bound)
    assert m["peak_f1"] >= 0.75, m  # measured 0.90 (precision 0.95, recall 0.86); chance bound 0.030, simulated 0.016
    assert m["peak_f1"] >= 10 * bound, (m["peak_f1"], bound)
    assert m["peak_precision"] >= 0.7 and m["peak_recall"] >= 0.7, m
    assert m["centroid_rmse_px"] < 1.0, m  # matched peaks are found where they are, not just near


def test_training_loss_went_down(learned_run):
    rows = list(csv.DictReader(open(learned_run / "logs" / "metrics.csv")))
    loss = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(loss) == 160  # one per step
    first, last = np.mean(loss[:20]), np.mean(loss[-20:])
    assert last < 0.5 * first, (first, last)


def test_metrics_csv_logs_the_learning_rate(learned_run):
    """LearningRateMonitor: one ``lr-AdamW/pg<i>`` column per parameter group, every step. The values follow the
    job's schedule (linear warm-up, then cosine to ``min_lr_factor``) and the layer-wise decay: the largest group
    (heads, queries, final norm) gets ``lr * factor(step)``, every other group ``llrd ** k`` of it."""
    from vitkit.tasks.train.schedule import warmup_decay_lambda

    cfg = OmegaConf.load(learned_run / "config.yaml")
    rows = list(csv.DictReader(open(learned_run / "logs" / "metrics.csv")))
    cols = [c for c in rows[0] if c.startswith("lr-AdamW")]
    assert cols and all(re.fullmatch(r"lr-AdamW/pg\d+", c) for c in cols), list(rows[0])
    lr_rows = [r for r in rows if r[cols[0]]]
    steps = [int(r["step"]) for r in lr_rows]
    assert steps == list(range(cfg.trainer.max_steps)), steps[:5]  # logged at every optimizer step
    m = cfg.module
    factor = warmup_decay_lambda(cfg.trainer.max_steps, m.warmup_steps, m.schedule, m.poly_power, m.min_lr_factor)
    llrd_powers = {round(m.llrd ** k, 9) for k in range(cfg.model.depth)}
    for r in lr_rows:
        lrs = np.array([float(r[c]) for c in cols])
        want = m.lr * factor(int(r["step"]))
        assert lrs.max() == pytest.approx(want, rel=1e-6), (r["step"], lrs.max(), want)
        assert {round(v, 9) for v in lrs / lrs.max()} <= llrd_powers
    top = [max(float(r[c]) for c in cols) for r in lr_rows]
    assert top[0] < top[m.warmup_steps - 1] and top[-1] < 0.05 * max(top)  # warm-up, then decay to near zero


# ------------------------------------------------------------------------------- README's config groups
def readme_train_commands() -> list[list[str]]:
    """The overrides of every `vitkit train ...` line in the README's command blocks, split as a shell would, with
    placeholders filled in (``runs/<run>`` -> ``runs/run``)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cmds = []
    for line in readme.splitlines():
        if line.startswith("vitkit train"):
            cmds.append(shlex.split(re.sub(r"<(\w+)>", r"\1", line.split("#")[0]))[2:])
    return cmds


def test_readme_train_lines_compose():
    """Each README `vitkit train` line composes (Hydra groups exist, overrides apply) and builds its model."""
    from hydra.utils import instantiate

    from vitkit.apps.peaks.job import compose

    cmds = readme_train_commands()
    flat = [o for c in cmds for o in c]
    for group in ("model=eomt_vits16", "trainer=ddp", "data=files", "trainer=fsdp"):
        assert group in flat, f"README no longer uses {group}: update this test"
    for overrides in cmds:
        cfg = compose(overrides)
        for o in overrides:
            key, value = o.split("=", 1)
            if key == "model":
                assert cfg.model.backbone == "dinov3_vits16"  # eomt_vits16: EoMT-S on DINOv3 ViT-S/16
            elif key == "trainer":
                assert cfg.trainer.strategy == value and cfg.trainer.devices == 2
            elif key == "data":
                assert cfg.data.source == value
            else:
                assert str(OmegaConf.select(cfg, key)) == value, (key, OmegaConf.select(cfg, key))
        if "model=eomt_vits16" in overrides:
            with torch.device("meta"):  # the architecture only: no memory, no init cost
                model = instantiate(OmegaConf.to_container(cfg.model, resolve=True))
            assert type(model).__name__ == "EoMT" and model.encoder.config.family == "dinov3"
            assert model.encoder.config.embed_dim == 384 and model.encoder.config.depth == 12


def test_readme_groups_train_through_vitkit_train(tmp_path):
    """``model=eomt_vits16 data=files trainer=ddp`` together, through `vitkit train` (two CPU processes, gloo):
    EoMT-S on DINOv3 ViT-S/16 trains 2 steps on labelled zarr frames, then predicts and evaluates held-out files.
    Kept to seconds by small crops and batches and by 4 of the 12 blocks (each checkpoint of the full model, with
    its optimizer state, is 284 MB); width, heads, RoPE, registers and the EoMT head are the README's (the full
    12-block model is built in test_readme_train_lines_compose)."""
    from test_peaks_job import run_cli
    from vitkit.apps.peaks.io import write_zarr
    from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset

    ds = SyntheticPeakDataset(6, cfg=SynthConfig(shape=(80, 96)), seed=3)
    items = [ds[i] for i in range(6)]
    images = np.stack([it["image"][0].numpy() for it in items])
    labels = np.stack([it["label"].numpy() for it in items])
    write_zarr(tmp_path / "train.zarr", images[:4], labels[:4])
    write_zarr(tmp_path / "test.zarr", images[4:], labels[4:])
    run = tmp_path / "run"
    res = run_cli("train", "model=eomt_vits16", "data=files", "trainer=ddp", f"run_dir={run}",
                  f"data.train={tmp_path / 'train.zarr'}", f"data.val={tmp_path / 'test.zarr'}",
                  f"data.test={tmp_path / 'test.zarr'}", "data.crop=[64,64]", "data.batch_size=2",
                  "data.num_workers=0", "+model.depth=4", "trainer.max_steps=2", "trainer.val_check_interval=1",
                  "predict.overlays=0", "sparse.steps=4", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(run)  # printed once, by rank 0
    cfg = OmegaConf.load(run / "config.yaml")
    assert (cfg.model.backbone, cfg.data.source, cfg.trainer.strategy, cfg.trainer.devices) == \
           ("dinov3_vits16", "files", "ddp", 2)
    assert (cfg.model.mask_stride, cfg.model.num_q, cfg.model.num_blocks) == (2, 32, 3)  # eomt_vits16's values
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert len(ckpt["vitkit_rng"]) == 2  # both ranks trained (their RNG states are saved)
    m = json.loads((run / "metrics.json").read_text())
    assert m["num_frames"] == 2 and {"peak_f1", "pixel_iou"} <= set(m)
    shutil.rmtree(run / "checkpoints")  # ~100 MB that pytest would keep for three sessions
