"""Interrupted work: `kill -9` during `vitkit predict` and during `vitkit stream` leaves no half-written CXI, CSV or
PNG under its final name, and re-running the same command redoes the work cleanly.

Temporaries: every writer writes ``.NAME.tmp-HOST-PID-XXXXXXXX`` next to ``NAME`` and renames it at the end. A killed
process leaves its temporary behind (hidden, never under the final name); the next write of ``NAME`` on the same host
deletes the temporaries of ``NAME`` whose process is gone, so they do not pile up (vitkit.apps.peaks.io).

Cost: one 3-step `vitkit train` (~17 s), five `vitkit predict` runs on 16 small frames (four killed) and one
in-process reference, two `vitkit stream` runs (one killed); each subprocess pays its own imports (and each stream
its own local Ray): about 2 min measured on 2 cores shared with other work, most of it process start-up.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset
from vitkit.apps.peaks.writers import CSV_COLUMNS

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
# a tiny EoMT trained for 3 steps: cheap, deterministic, and it finds a few peaks at --threshold 0.3
TRAIN = ["data=synthetic", "trainer.max_steps=3", "module.lr=1e-2", "module.warmup_steps=1", "model.embed_dim=32",
         "model.depth=2", "model.num_q=4", "data.num_train=12", "data.batch_size=4", "data.num_val=1",
         "data.num_test=0", "data.frame_shape=[64,64]", "trainer.val_check_interval=3", "predict.overlays=0",
         "module.loss.num_points=1024", "sparse.steps=4"]
N, SHAPE = 16, (64, 96)
PREDICT = ["--threshold", "0.3", "--overlays", "3", "--write-frames"]
OUTPUTS = {"peaks.cxi", "peaks.csv", "overlay_0000.png", "overlay_0001.png", "overlay_0002.png"}
TEMP = re.compile(r"^\.(?P<target>.+)\.(tmp|old)-")
# Killed predict runs write slowly, so that "kill while the CXI (or a PNG) is being written" is a wide window
# rather than a race: 40 ms per HDF5 frame write (16 frames: ~0.6 s inside the CXI temporary) and 0.3 s before
# each PNG is rendered into its (already open) temporary. What is written, and how, is unchanged.
SLOW_WRITES = """
import time, h5py, matplotlib.figure as mf
_set, _save = h5py.Dataset.__setitem__, mf.Figure.savefig
h5py.Dataset.__setitem__ = lambda self, k, v: (time.sleep(0.04), _set(self, k, v))[1]
mf.Figure.savefig = lambda self, *a, **kw: (time.sleep(0.3), _save(self, *a, **kw))[1]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("interrupted") / "run"
    res = subprocess.run([sys.executable, "-m", "vitkit.cli", "train", f"run_dir={run}", *TRAIN],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    ds = SyntheticPeakDataset(N, SynthConfig(shape=SHAPE), seed=7)
    a = np.stack([np.asarray(ds[i]["image"], dtype=np.float32).reshape(SHAPE) for i in range(N)])
    path = tmp_path_factory.mktemp("frames") / "frames.npy"
    np.save(path, a)
    return path


@pytest.fixture(scope="module")
def reference(run, frames, tmp_path_factory):
    """An uninterrupted `vitkit predict` (run in this process through the CLI's own parser and command)."""
    from vitkit.cli import build_parser

    out = tmp_path_factory.mktemp("reference")
    args = build_parser().parse_args(["predict", str(run), str(frames), "--out", str(out), *PREDICT])
    assert args.func(args) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS
    return out


# ------------------------------------------------------------------------------------------ checks
def _datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # a truncated PNG fails here
        return np.asarray(im)


def _check_complete(out: Path, ref: Path) -> tuple[set[str], set[str]]:
    """Every file under a final name is complete (equal to the uninterrupted run's); every other entry is a hidden
    temporary of one of the outputs. Returns (final names, targets of temporaries)."""
    finals, temps = set(), set()
    for p in out.iterdir() if out.exists() else ():
        m = TEMP.match(p.name)
        if m:
            assert m.group("target") in OUTPUTS, p.name
            temps.add(m.group("target"))
            continue
        assert p.name in OUTPUTS, f"unexpected file {p.name}"
        finals.add(p.name)
        if p.suffix == ".cxi":
            got, want = _datasets(p), _datasets(ref / p.name)
            assert got["entry_1/result_1/nPeaks"].shape == (N,) and got["entry_1/data_1/data"].shape == (N, *SHAPE)
            assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
        elif p.suffix == ".csv":
            lines = p.read_text().splitlines()
            assert lines[0] == ",".join(CSV_COLUMNS)
            assert p.read_bytes() == (ref / p.name).read_bytes(), f"{len(lines) - 1} rows"
        else:
            assert np.array_equal(_png(p), _png(ref / p.name)), p.name
    return finals, temps


def _kill_when(cmd: list[str], when, timeout: float = 300) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    t0 = time.monotonic()
    try:
        while not when(time.monotonic() - t0):
            assert proc.poll() is None, "predict finished before it could be killed"
            assert time.monotonic() - t0 < timeout
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _appeared(out: Path, prefix: str, delay: float = 0.0):
    """A trigger: an entry of ``out`` starting with ``prefix`` exists (then wait ``delay``)."""
    def when(_elapsed: float) -> bool:
        if out.is_dir() and any(e.name.startswith(prefix) for e in os.scandir(out)):
            time.sleep(delay)
            return True
        return False
    return when


# --------------------------------------------------------------------------------------- temporaries
def test_a_write_deletes_only_the_stale_temporaries_of_its_own_target(tmp_path):
    """What the re-runs below rely on: writing NAME deletes NAME's temporaries of dead processes on this host,
    and nothing else (a running process's, another host's, another file's)."""
    from vitkit.apps.peaks.io import write_csv
    from vitkit.atomic import _host

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid no longer runs
    host = _host()
    names = {"stale": f".peaks.csv.tmp-{host}-{dead.pid}-0123abcd",
             "stale_zarr_backup": f".peaks.csv.old-{host}-{dead.pid}-0123abce",
             "running": f".peaks.csv.tmp-{host}-{os.getppid()}-0123abcf",
             "other_host": f".peaks.csv.tmp-elsewhere-{dead.pid}-0123abd0",
             "other_file": f".peaks.cxi.tmp-{host}-{dead.pid}-0123abd1"}
    for n in names.values():
        (tmp_path / n).write_text("partial")
    write_csv(tmp_path / "peaks.csv", [])
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"peaks.csv", names["running"], names["other_host"], names["other_file"]}


# ----------------------------------------------------------------------------------------- predict
def test_predict_killed_at_any_moment_leaves_only_complete_files_and_reruns_cleanly(run, frames, reference,
                                                                                     tmp_path):
    out = tmp_path / "out"
    args = [str(run), str(frames), "--out", str(out), *PREDICT]
    code = f"{SLOW_WRITES}\nimport sys\nfrom vitkit.cli import main\nsys.exit(main(sys.argv[1:]))"
    slow = [sys.executable, "-c", code, "predict", *args]

    _kill_when(slow, lambda t: t >= 1.0)  # importing / loading the model
    _check_complete(out, reference)
    _kill_when(slow, lambda t: t >= 2.0)
    _check_complete(out, reference)

    # the first entry to appear in the output folder is the CXI temporary: kill while frames go into it
    _kill_when(slow, _appeared(out, ".peaks.cxi.tmp", delay=0.2))
    finals, temps = _check_complete(out, reference)
    assert "peaks.cxi" not in finals and "peaks.cxi" in temps, (finals, temps)

    # CXI and CSV are done; kill while the second overlay is being rendered into its temporary
    _kill_when(slow, _appeared(out, ".overlay_0001.png.tmp"))
    finals, temps = _check_complete(out, reference)
    assert {"peaks.cxi", "peaks.csv", "overlay_0000.png"} <= finals and "overlay_0001.png" not in finals
    assert "overlay_0001.png" in temps

    # the same command again: everything redone, equal to the uninterrupted run, and no temporary left over
    res = subprocess.run([sys.executable, "-m", "vitkit.cli", "predict", *args], capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    finals, temps = _check_complete(out, reference)
    assert finals == OUTPUTS and not temps, sorted(p.name for p in out.iterdir())


# ------------------------------------------------------------------------------------------ stream
def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, session id, start time) of every running process (not zombies), from /proc/PID/stat."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()  # fields after "(comm)": state ppid pgrp session ...
        if f[0] != "Z":
            table[int(d)] = (int(f[1]), int(f[3]), int(f[19]))
    return table


def _ray_leftovers(driver: int) -> dict[int, int]:
    """Processes the stream driver started (its descendants, and members of its session): Ray's gcs_server, raylet,
    workers and actors. -> {pid: start time}."""
    table = _proc_table()
    found, todo = {}, [driver]
    while todo:
        p = todo.pop()
        for c, (ppid, _, start) in table.items():
            if ppid == p and c not in found:
                found[c] = start
                todo.append(c)
    found.update({p: start for p, (_, sid, start) in table.items() if sid == driver and p != driver})
    return found


def _kill_all(procs: dict[int, int]) -> None:
    """SIGKILL these processes by pid, skipping a pid that now belongs to another process (start time differs)."""
    for pid, start in procs.items():
        info = _proc_table().get(pid)
        if info is not None and info[2] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_stream_killed_mid_run_leaves_no_output_and_reruns_to_a_complete_cxi(run, tmp_path):
    """SIGKILL of the driver leaves the local Ray it started without its owner: most of Ray's processes follow the
    driver (fate sharing), but some are reparented and keep running (here: ray::DashboardAgent and
    ray::RuntimeEnvAgent, still alive seconds later). The test starts the driver in its own session, notes the
    driver's descendants and session members from /proc right before the kill and SIGKILLs them by pid right after
    it (and again on failure), checking each one's start time so that a reused pid is never hit.

    The progress line comes every 0.5 s (not 1 s) so that a fast machine still shows one before 200 frames are done.
    """
    out = tmp_path / "stream"
    cmd = [sys.executable, "-m", "vitkit.cli", "stream", "default", f"model.checkpoint={run}", "source.kind=synthetic",
           "source.num_frames=200", "source.shape=[64,96]", f"output.dir={out}", "ray.num_cpus=2",
           "model.num_cpus=0.5", "peaks.num_cpus=0.5", "report_every_s=0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    leftovers: dict[int, int] = {}
    seen = []
    try:
        deadline = time.monotonic() + 300
        while True:  # the first progress line: frames are flowing through the pipeline
            assert proc.poll() is None, "stream ended before it could be killed:\n" + "".join(seen[-20:])
            assert time.monotonic() < deadline, "no progress line:\n" + "".join(seen[-20:])
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(line)
            if re.match(r"\[stream +[\d.]+ s\] \d+ frames written", line):
                break
        leftovers = _ray_leftovers(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_all(leftovers)
        assert leftovers, "expected Ray processes under the driver"
        assert not (out / "peaks.cxi").exists() and not (out / "stream_stats.json").exists()
        entries = [p.name for p in out.iterdir()]
        assert all(TEMP.match(e) for e in entries), entries
        assert any(e.startswith(".peaks.cxi.tmp-") for e in entries), entries  # the writer's open temporary
    finally:
        proc.kill()
        proc.wait()
        _kill_all(leftovers)

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    got = _datasets(out / "peaks.cxi")
    assert got["entry_1/result_1/nPeaks"].shape == (200,)
    assert np.array_equal(got["entry_1/result_1/frameIndex"], np.arange(200))
    import json

    assert json.loads((out / "stream_stats.json").read_text())["rows"] == 200
    assert sorted(p.name for p in out.iterdir()) == ["peaks.cxi", "stream_stats.json"]  # no stale temporary
    alive = [p for p, start in leftovers.items() if _proc_table().get(p, (0, 0, -1))[2] == start]
    assert not alive, f"processes of the killed stream still running: {alive}"
