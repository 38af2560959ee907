"""The PeakNet job end to end: `vitkit train` / `predict` / `evaluate`, CXI read-back, resume after kill -9,
DDP on 2 CPU processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import free_port

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_q=4", "data.num_train=32", "data.num_val=4",
        "data.num_test=2", "trainer.val_check_interval=4", "predict.overlays=1",  # the default: epix10k2M shots
        "sparse.steps=4"]  # the sparse-token fine-tune runs, briefly (800 steps in the main job)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("job") / "run"
    res = run_cli("train", f"run_dir={run}", "trainer.max_steps=12", *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    return run, res


def test_train_writes_everything_and_prints_the_run_dir_last(trained_run):
    from vitkit.apps.peaks.detector import builtin_detector
    from vitkit.apps.peaks.geom import read_geom

    run, res = trained_run
    assert res.stdout.strip().splitlines()[-1] == str(run)
    assert "Epoch 2" in res.stdout and "predict: 100%" in res.stderr  # progress bars (Lightning: stdout)
    for name in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "metrics.json", "peaks.cxi", "peaks.csv",
                 "overlay_0000.png", "curves.png", "config.yaml", "model/model.safetensors", "logs/metrics.csv",
                 "detector.geom"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("peak_precision", "peak_recall", "peak_f1", "pixel_iou", "centroid_rmse_px"):
        assert key in metrics
    assert metrics["num_frames"] == 2
    det = read_geom(run / "detector.geom")
    assert det.stack_shape == (16, 352, 384) and det.panel_names == builtin_detector("epix10k2m").panel_names


def test_cxi_reads_back_with_h5py(trained_run):
    run, _ = trained_run
    with h5py.File(run / "peaks.cxi", "r") as f:
        res = f["/entry_1/result_1"]
        n = res["nPeaks"][()]
        assert n.shape == (2,) and n.dtype == np.int32
        for name in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity", "peakSNR"):
            assert res[name].shape == (2, 2048) and res[name].dtype == np.float32
        rows = []
        for i in range(2):
            for j in range(n[i]):
                rows.append((i, res["peakYPosRaw"][i, j], res["peakXPosRaw"][i, j], res["peakTotalIntensity"][i, j]))
            assert not res["peakXPosRaw"][i, n[i]:].any()  # zero padding past nPeaks
    lines = (run / "peaks.csv").read_text().strip().splitlines()
    assert lines[0] == "frame,panel,fs,ss,slab_fs,slab_ss,x_lab,y_lab,intensity,npix,max_value,snr"
    csv_rows = [[float(v) for v in line.split(",")] for line in lines[1:]]
    assert len(csv_rows) == len(rows)
    assert all(r[11] >= 5.5 for r in csv_rows)  # PeakFinder's min_snr, written per peak
    got = np.array([(r[0], r[5], r[4], r[8]) for r in csv_rows], dtype=np.float64).reshape(-1, 4)
    assert np.allclose(got, np.array(rows, dtype=np.float64).reshape(-1, 4), rtol=1e-5, atol=1e-3)
    for r in csv_rows:  # slab = panel offset (psana order along slow scan) + panel-local
        assert r[5] == pytest.approx(r[3] + 352 * r[1]) and r[4] == pytest.approx(r[2])


def test_predict_multi_panel_stack_with_geometry_and_mask(trained_run, tmp_path):
    """The issue's acceptance: a 4-event [4, 16, 352, 384] HDF5 stack with a mask, through the CLI."""
    from vitkit.apps.peaks.detector import builtin_detector
    from vitkit.apps.peaks.geom import write_geom
    from vitkit.apps.peaks.lattice import LatticeConfig, LatticeStillsDataset

    run, _ = trained_run
    det = builtin_detector("epix10k2m")
    shots = LatticeStillsDataset(4, det, LatticeConfig(), seed=123, panels_per_item=None)
    items = [shots[i] for i in range(4)]
    with h5py.File(tmp_path / "stack.h5", "w") as f:
        f.create_dataset("/entry_1/data_1/data", data=np.stack([it["image"][:, 0].numpy() for it in items]))
    good = items[0]["good"].numpy().copy()
    good[:, 100:200, 100:200] = False  # a big masked block: nothing may be reported inside
    with h5py.File(tmp_path / "mask.h5", "w") as f:
        f.create_dataset("/data/data", data=good.astype(np.uint8))
    write_geom(det, tmp_path / "det.geom")
    res = run_cli("predict", str(run), str(tmp_path / "stack.h5"), "--geometry", str(tmp_path / "det.geom"),
                  "--mask", str(tmp_path / "mask.h5"), "--out", str(tmp_path / "p"), "--min-pixels", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    with h5py.File(tmp_path / "p" / "peaks.cxi", "r") as f:
        r = f["/entry_1/result_1"]
        n, xs, ys = r["nPeaks"][()], r["peakXPosRaw"][()], r["peakYPosRaw"][()]
    assert n.shape == (4,)
    from vitkit.apps.peaks.io import read_csv_peaks

    tables = read_csv_peaks(tmp_path / "p" / "peaks.csv", n_frames=4)
    for e, t in enumerate(tables):
        assert len(t) == n[e]
        np.testing.assert_allclose(xs[e, :n[e]], t["slab_fs"], rtol=1e-6)
        np.testing.assert_allclose(ys[e, :n[e]], t["slab_ss"], rtol=1e-6)
        np.testing.assert_allclose(t["slab_ss"], t["ss"] + 352 * t["panel"], rtol=1e-9)
        assert ((t["panel"] >= 0) & (t["panel"] < 16)).all()
        assert good[t["panel"], np.rint(t["ss"]).astype(int), np.rint(t["fs"]).astype(int)].all()
    assert (tmp_path / "p" / "detector.geom").exists()


def test_predict_writes_dials_inputs(trained_run, tmp_path):
    from vitkit.apps.peaks import dials
    from vitkit.apps.peaks.detector import builtin_detector
    from vitkit.apps.peaks.io import read_csv_peaks
    from vitkit.apps.peaks.lattice import LatticeConfig, LatticeStillsDataset

    ok, why = dials.dials_available()
    if not ok:
        pytest.skip(f"DIALS not installed: {why}")
    run, _ = trained_run
    shots = LatticeStillsDataset(2, builtin_detector("epix10k2m"), LatticeConfig(intensity_scale=(3000, 3000)),
                                 seed=5, panels_per_item=None)
    np.save(tmp_path / "ev.npy", np.stack([shots[i]["image"][:, 0].numpy() for i in range(2)]))
    res = run_cli("predict", str(run), str(tmp_path / "ev.npy"), "--out", str(tmp_path / "p"), "--dials",
                  "--min-pixels", "1", "--threshold", "0.3")
    assert res.returncode == 0, res.stderr[-3000:]
    refl = dials.read_reflections(tmp_path / "p" / "strong.refl")
    tables = read_csv_peaks(tmp_path / "p" / "peaks.csv", n_frames=2)
    assert len(refl["panel"]) == sum(len(t) for t in tables)
    both = np.concatenate(tables)
    np.testing.assert_array_equal(refl["panel"], both["panel"])
    np.testing.assert_allclose(refl["xyzobs.px.value"][:, 0], both["fs"] + 0.5, atol=1e-6)  # DIALS: corner origin
    np.testing.assert_allclose(refl["xyzobs.px.value"][:, 1], both["ss"] + 0.5, atol=1e-6)
    assert (tmp_path / "p" / "imported.expt").stat().st_size > 1000


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """`vitkit ARGS` through the same entry point (vitkit.cli.main) in this process: the CLI's error handling
    without a new interpreter and its imports per call."""
    from vitkit.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def test_predict_and_evaluate_on_single_frames_of_any_size(trained_run, tmp_path, capsys):
    """Plain frames (not the run's detector) are one-panel events, as before (the CLI's entry point, in process)."""
    run_cli = lambda *a: cli_here(capsys, *a)  # noqa: E731
    from vitkit.apps.peaks.io import read_cxi_peaks, write_zarr
    from vitkit.apps.peaks.job import PeakFinder, load_model, predict
    from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset

    run, _ = trained_run
    ds = SyntheticPeakDataset(3, cfg=SynthConfig(shape=(100, 150)), seed=42)
    images = np.stack([ds[i]["image"].numpy().reshape(100, 150) for i in range(3)])
    labels = np.stack([ds[i]["label"].numpy() for i in range(3)])
    write_zarr(tmp_path / "frames.zarr", images, labels)
    np.save(tmp_path / "frames.npy", images)

    out_z = tmp_path / "pz"
    res = run_cli("predict", str(run), str(tmp_path / "frames.zarr"), "--out", str(out_z), "--overlays", "1",
                  "--min-pixels", "1", "--dense")  # a checkpoint file is that (dense) model
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("predict", str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "frames.npy"),
                  "--out", str(tmp_path / "pn"), "--min-pixels", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_cxi_peaks(out_z / "peaks.cxi"), read_cxi_peaks(tmp_path / "pn" / "peaks.cxi")
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
    # the CLI equals the library call, frame for frame, in input order
    direct = predict(PeakFinder(load_model(run), min_pixels=1), images, tmp_path / "lib", overlays=0,
                     progress=False)
    assert all(np.allclose(x[:, :2], np.stack([y["ss"], y["fs"]], 1), atol=1e-4) for x, y in zip(a, direct["peaks"]))

    res = run_cli("evaluate", str(run), str(tmp_path / "frames.zarr"), "--out", str(tmp_path / "ev"))
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"peak_f1", "pixel_iou", "pixel_dice", "centroid_rmse_px"} <= set(m) and m["num_frames"] == 3
    assert "peak_f1" in res.stdout


def test_bad_inputs_give_clear_errors(trained_run, tmp_path, capsys):
    run, _ = trained_run
    run_cli = lambda *a: cli_here(capsys, *a)  # noqa: E731 - the same calls as a user's, in process
    bad = np.zeros((2, 64, 64), dtype=np.float32)
    bad[1, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    res = run_cli("predict", str(run), str(tmp_path / "nan.npy"), "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "NaN" in res.stderr and "frame 1" in res.stderr
    res = run_cli("predict", str(tmp_path / "nowhere"), str(tmp_path / "nan.npy"))
    assert res.returncode != 0 and "no checkpoint" in res.stderr
    assert not (tmp_path / "o" / "peaks.cxi").exists()
    np.save(tmp_path / "eight.npy", np.zeros((2, 8, 352, 384), np.float32))  # a stack of the wrong detector
    res = run_cli("predict", str(run), str(tmp_path / "eight.npy"), "--out", str(tmp_path / "o8"))
    assert res.returncode == 2 and "eight.npy" in res.stderr and "(8, 352, 384)" in res.stderr
    assert "16, 352, 384" in res.stderr and not (tmp_path / "o8").exists()
    np.save(tmp_path / "m.npy", np.ones((8, 352, 384), np.uint8))
    np.save(tmp_path / "ok.npy", np.zeros((1, 16, 352, 384), np.float32))
    res = run_cli("predict", str(run), str(tmp_path / "ok.npy"), "--mask", str(tmp_path / "m.npy"))
    assert res.returncode == 2 and "m.npy" in res.stderr and "(8, 352, 384)" in res.stderr


def _ckpt_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception:
        return -1


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    args = ["trainer.max_steps=40", *TINY, "data.num_test=1"]
    ref = run_cli("train", f"run_dir={tmp_path / 'ref'}", *args)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vitkit.cli", "train", f"run_dir={run}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists():  # first epoch checkpoint (written atomically): kill right away
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists()
    killed_at = _ckpt_step(last)
    assert 4 <= killed_at < 40, killed_at

    res = run_cli("train", f"resume={run}", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text()) == json.loads((tmp_path / "ref" / "metrics.json").read_text())
    from safetensors.torch import load_file

    a, b = load_file(run / "model" / "model.safetensors"), load_file(tmp_path / "ref" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


DDP_SCRIPT = r"""
import hashlib, sys, torch, lightning as L
from vitkit.apps.peaks.job import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from vitkit.apps.peaks.datamodule import PeakDataModule
from vitkit.tasks.train import SegmentationModule

cfg = compose(["model.embed_dim=32", "model.depth=2", "model.num_q=4", "data.num_train=32", "data.num_val=4"])
L.seed_everything(0, verbose=False)
model = instantiate(OmegaConf.to_container(cfg.model, resolve=True))
module = SegmentationModule(model, **OmegaConf.to_container(cfg.module, resolve=True))
data = PeakDataModule(**OmegaConf.to_container(cfg.data, resolve=True))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=sys.argv[2], max_steps=3, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                    limit_val_batches=0)
trainer.fit(module, datamodule=data)
flat = torch.cat([p.detach().flatten() for p in module.model.parameters()])
digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
open(f"{sys.argv[1]}/rank{trainer.global_rank}.txt", "w").write(f"{digest} {trainer.global_step}")
"""


def test_ddp_two_cpu_processes_keep_parameters_identical(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path), "ddp"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert r0 == r1 and r0.endswith(" 3"), (r0, r1)


def test_synth_cli_writes_peaknet_zarr(tmp_path):
    from vitkit.apps.peaks.io import open_frames

    res = run_cli("synth", str(tmp_path / "s.zarr"), "--n", "3", "--shape", "64", "96", "--seed", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    frames = open_frames(tmp_path / "s.zarr")
    assert len(frames) == 3 and frames.has_labels and frames[0].shape == (64, 96) and frames[0].dtype == np.float32
    assert set(np.unique(frames.label(0))) <= {0, 1} and frames.label(0).any()


def test_bf16_accumulation_clipping_and_cosine_run(tmp_path, monkeypatch):
    """The training knobs of the recipe, each observed during the run: every training step runs under bf16
    autocast; accumulation 2 gives one optimizer step per two batches; clipping brings the gradient norm seen by
    the optimizer to <= 0.5 (and some steps needed it); the learning rate follows linear warm-up then cosine decay.
    The learning rate is read from the optimizer at each step (logs/metrics.csv has it too: test_train_learns.py)."""
    import math

    from vitkit.apps.peaks.job import compose, train
    from vitkit.tasks.train import SegmentationModule

    seen = {"autocast": [], "factor": [], "norm": [], "unclipped": []}
    training_step = SegmentationModule.training_step

    def spy_training_step(self, *args, **kwargs):
        seen["autocast"].append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return training_step(self, *args, **kwargs)

    adamw_step = torch.optim.AdamW.step

    def spy_step(opt, *args, **kwargs):
        g = opt.param_groups[0]
        seen["factor"].append(g["lr"] / g["initial_lr"])
        return adamw_step(opt, *args, **kwargs)  # Lightning's closure (backward, clipping) runs inside

    clip = torch.nn.utils.clip_grad_norm_

    def spy_clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        total = clip(parameters, *args, **kwargs)
        seen["unclipped"].append(float(total))
        grads = [p.grad.float() for p in parameters if p.grad is not None]
        seen["norm"].append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))
        return total

    monkeypatch.setattr(SegmentationModule, "training_step", spy_training_step)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)

    steps, warmup = 6, 2
    cfg = compose([f"run_dir={tmp_path / 'r'}", f"trainer.max_steps={steps}", "trainer.precision=bf16-mixed",
                   "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.5", "module.schedule=cosine",
                   f"module.warmup_steps={warmup}", "module.min_lr_factor=0.0", "data.num_test=0", *TINY[:5]])
    run = train(cfg)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps and len(seen["factor"]) == steps  # optimizer steps
    assert len(seen["autocast"]) == 2 * steps  # batches: two per optimizer step
    assert set(seen["autocast"]) == {(True, torch.bfloat16)}
    assert len(seen["unclipped"]) == steps and max(seen["unclipped"]) > 0.5  # clipping had work to do
    assert max(seen["norm"]) <= 0.5 * (1 + 1e-3), seen["norm"]
    # warm-up (s + 1) / warmup, then 0.5 (1 + cos(pi t)), t = (s - warmup) / (steps - warmup); poly would give
    # (1 - t) ** 0.9 = 1, 0.77, 0.54, 0.29 where cosine gives 1, 0.85, 0.5, 0.15
    want = [(s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
            for s in range(steps)]
    assert seen["factor"] == pytest.approx(want, abs=1e-6), seen["factor"]
    assert not (run / "metrics.json").exists()  # no held-out frames asked for


def test_ddp_under_torchrun(tmp_path):
    """The same DDP training launched by torchrun (Lightning picks up the torchelastic environment)."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(script), str(tmp_path), "ddp"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert r0 == r1 and r0.endswith(" 3"), (r0, r1)


def test_evaluate_defaults_to_the_runs_held_out_frames(trained_run, tmp_path):
    run, _ = trained_run
    res = run_cli("evaluate", str(run), "--out", str(tmp_path / "ev"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    want = json.loads((run / "metrics.json").read_text())
    # same model (the run's default, which `vitkit train` kept the predictions of), same held-out synthetic frames;
    # the job's metrics also hold the other model's scores when the run has both
    assert got == {k: v for k, v in want.items() if k not in ("dense", "sparse")}


def test_readme_event_loop_example_runs_as_written(trained_run, tmp_path, monkeypatch):
    """The README's ten-line event loop (vitkit.PeakFinder.from_run, one event [16, 352, 384] at a time), run
    as written on simulated shots with a .geom and a mask file; only the run path is substituted."""
    import contextlib
    import io
    import re

    from vitkit.apps.peaks.detector import builtin_detector
    from vitkit.apps.peaks.geom import write_geom

    run, _ = trained_run
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- event-loop example.*?-->\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(block.strip().splitlines()) <= 10 and 'run, geometry, mask = "runs/<run>"' in block
    monkeypatch.chdir(tmp_path)
    det = builtin_detector("epix10k2m")
    write_geom(det, "epix.geom")
    good = np.ones(det.stack_shape, dtype=np.uint8)
    good[3] = 0  # panel 3 masked whole: no peak may come from it
    with h5py.File("mask.h5", "w") as f:
        f["mask"] = good
    out, ns = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
        exec(compile(block.replace("runs/<run>", str(run)), "README.md", "exec"), ns)
    lines = [ln for ln in out.getvalue().splitlines() if ln[:1].isdigit()]
    assert [ln.split()[0] for ln in lines] == ["0", "1"], out.getvalue()
    finder, peaks = ns["finder"], ns["peaks"]  # the example's own objects, after its last event
    assert finder.detector.stack_shape == (16, 352, 384) and not finder.good[3].any() and finder.good[4].all()
    assert int(lines[-1].split()[1]) == len(peaks) and peaks.dtype.names[:3] == ("panel", "fs", "ss")
    assert not (peaks["panel"] == 3).any() and np.isfinite(peaks["x_lab"]).all()
