"""Streaming inference on Ray (`vitkit stream`, vitkit.apps.peaks.stream): output equal to `vitkit predict`,
ordering and dedupe, bounded frames in flight, actor death and restart, queue sources with several producers, clean
shutdown, helpful errors, and vitkit without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from vitkit.apps.peaks.cxi import OrderedCXIWriter
from vitkit.apps.peaks.io import read_cxi_peaks, write_cxi, write_zarr
from vitkit.apps.peaks.stream.config import load_stream_config
from vitkit.apps.peaks.stream.stages import FileStream, pack_masks, unpack_masks
from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset
from vitkit.errors import ConfigError, InputError

# a tiny EoMT trained for a few steps finds real peaks on 64 x 64 windows (F1 ~0.7 on held-out frames)
TRAIN = ["data=synthetic", "trainer.max_steps=16", "module.lr=1e-2", "module.warmup_steps=2", "model.embed_dim=32",
         "model.depth=2", "model.num_q=4", "data.num_train=64", "data.num_val=2", "data.num_test=0",
         "data.frame_shape=[64,64]", "trainer.val_check_interval=16", "predict.overlays=0",
         "model.upscale_dims=null",  # 32 channels all the way: 16 steps of the default taper (64/32/16) find nothing
         "sparse.steps=4"]
N, SHAPE, SEED = 64, (64, 96), 7  # 96 wide: two overlapping 64 x 64 windows per frame
# 2 Ray CPUs: two actors at 0.5 + two peak tasks at 0.5
RES = ["model.num_cpus=0.5", "peaks.num_cpus=0.5", "peaks.workers=2", "report_every_s=0"]


def run_cli(*args: str, timeout: float = 300, pre: str = "pass") -> subprocess.CompletedProcess:
    code = f"import sys; {pre}; from vitkit.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


# ------------------------------------------------------------------------------------------ no Ray needed
def test_ordered_writer_orders_dedupes_and_survives_gaps(tmp_path):
    rng = np.random.default_rng(0)
    peaks = [rng.uniform(0, 50, size=(k, 3)) for k in (3, 0, 5, 2, 4, 1)]
    w = OrderedCXIWriter(tmp_path / "a.cxi", max_peaks=4, flush_every_s=0)
    assert w.add([(2, "c", peaks[2]), (1, "b", peaks[1])]) == ([], [])  # waits for frame 0
    assert w.add([(0, "a", peaks[0]), (1, "b2", peaks[1])]) == (["a", "b", "c"], ["b2"])  # 1 again: duplicate
    assert w.add([(0, "a2", peaks[0])]) == ([], ["a2"])  # already written: duplicate
    assert w.add([(5, "f", peaks[5])]) == ([], [])  # 3 and 4 missing
    assert w.flush_gap() == ["f"]  # give up on 3, 4
    assert w.add([(4, "e", peaks[4]), (6, "g", peaks[0])]) == (["e", "g"], [])  # 4 late; 6 next in order
    assert w.add([(4, "e2", peaks[4])]) == ([], ["e2"])
    assert not (tmp_path / "a.cxi").exists()  # atomic: only at close
    w.close()
    assert w.summary()["duplicates_dropped"] == 3 and w.gaps == 1 and w.late == 1
    with h5py.File(tmp_path / "a.cxi") as f:
        assert list(f["/entry_1/result_1/frameIndex"][()]) == [0, 1, 2, 5, 4, 6]
        assert f["cxi_version"][()] == 150
    # same layout and values as the batch writer (max_peaks: the brightest, in order)
    write_cxi(tmp_path / "b.cxi", [peaks[i] for i in (0, 1, 2, 5, 4, 0)], max_peaks=4)
    a, b = read_cxi_peaks(tmp_path / "a.cxi"), read_cxi_peaks(tmp_path / "b.cxi")
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == 6 and len(a[4]) == 4

    w = OrderedCXIWriter(tmp_path / "c.cxi")
    w.add([(0, 0, peaks[0])])
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cxi", "b.cxi"]  # no c.cxi, no temporary file


def test_masks_pack_to_one_bit_per_pixel_and_back():
    m = np.random.default_rng(1).random((3, 17, 21)) > 0.7
    packed = pack_masks(m)
    assert packed.dtype == np.uint8 and packed.shape == (3, 17, 3)
    assert np.array_equal(unpack_masks(packed, 21), m)
    assert np.array_equal(unpack_masks(pack_masks(m, "uint8"), 21, "uint8"), m)


def test_file_source_reads_hdf5_in_order(tmp_path):
    x = np.random.default_rng(2).random((5, 20, 24)).astype(np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["/entry_1/data_1/data"] = x
    src = FileStream(str(tmp_path / "f.h5"))
    got = src.poll(3) + src.poll(10)
    assert [it.index for it in got] == [0, 1, 2, 3, 4] and src.exhausted
    assert all(np.array_equal(it.data, x[it.index][None]) for it in got)  # one-panel events [1, H, W]
    assert got[2].event_id == f"frame 2 of {tmp_path / 'f.h5'}" and np.isnan(got[2].timestamp)


def test_config_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'model.batch_size'"):
        load_stream_config("default", ["model.checkpoint=x", "model.batchsize=4"])
    with pytest.raises(ConfigError, match="model.checkpoint is required"):
        load_stream_config("default", [])
    with pytest.raises(ConfigError, match="max_frames_in_flight .* must be >= model.batch_size"):
        load_stream_config("default", ["model.checkpoint=x", "max_frames_in_flight=2", "model.batch_size=4"])
    with pytest.raises(ConfigError, match="'model.num_actors'"):
        load_stream_config("default", ["model.checkpoint=x", "model.num_actors=two"])
    (tmp_path / "mine.yaml").write_text("model:\n  checkpoint: x\n  nactors: 2\n")
    with pytest.raises(ConfigError, match="unknown key 'model.nactors'.*'model.num_actors'"):
        load_stream_config(tmp_path / "mine.yaml")
    (tmp_path / "ok.yaml").write_text("model:\n  checkpoint: x\n  num_actors: 3\nsource:\n  kind: files\n"
                                      "  path: a.zarr\n")
    cfg = load_stream_config(str(tmp_path / "ok.yaml"), ["model.batch_size=2"])
    assert (cfg.model.num_actors, cfg.model.batch_size, cfg.source.path, cfg.peaks.workers) == (3, 2, "a.zarr", 2)


def test_vitkit_works_without_ray_and_stream_says_how_to_get_it():
    hide = "sys.modules['ray'] = None"  # any `import ray` now raises ImportError
    check = ("import sys\n"
             "import vitkit, vitkit.apps.peaks.stream, vitkit.apps.peaks.stream.config\n"
             "import vitkit.apps.peaks.stream.stages, vitkit.apps.peaks.cxi, vitkit.cli\n"
             "assert 'ray' not in sys.modules, 'vitkit imported ray'\n"
             f"{hide}\n"
             "try:\n    import vitkit.apps.peaks.stream.ray\n"
             "except vitkit.apps.peaks.stream.RayNotInstalledError as e:\n    print(e)\n"
             "else:\n    raise SystemExit('no error')\n")
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'pip install "vitkit[ray]"' in res.stdout
    res = run_cli("stream", "default", "model.checkpoint=x", pre=hide)
    assert res.returncode == 2 and 'pip install "vitkit[ray]"' in res.stderr, res.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ Ray
try:
    import ray
except ImportError:  # the tests below skip through the ray_local fixture
    ray = None


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    pytest.importorskip("ray")
    run = tmp_path_factory.mktemp("stream_model") / "run"
    res = subprocess.run([sys.executable, "-m", "vitkit.cli", "train", f"run_dir={run}", *TRAIN],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def reference(model_run, tmp_path_factory):
    """What `vitkit predict` writes for the synthetic frames (the run's default model, as the stream's)."""
    from vitkit.apps.peaks.job import PeakFinder, predict

    out = tmp_path_factory.mktemp("predict")
    frames = SyntheticPeakDataset(N, SynthConfig(shape=SHAPE), seed=SEED)
    predict(PeakFinder.from_run(model_run), frames, out, overlays=0, progress=False)
    peaks = read_cxi_peaks(out / "peaks.cxi")
    assert sum(len(p) for p in peaks) > 150, "the model should find peaks for the comparison to mean something"
    return peaks


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="vitkit-stream-test")
    yield
    if started:
        ray.shutdown()


def stream_cfg(run, out, *extra):
    return load_stream_config("default", [f"model.checkpoint={run}", f"output.dir={out}", f"source.num_frames={N}",
                                          f"source.shape=[{SHAPE[0]},{SHAPE[1]}]", f"source.seed={SEED}", *RES,
                                          *extra])


def assert_same_peaks(summary, expected):
    got = read_cxi_peaks(summary["output"])
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert np.array_equal(g, e), f"frame {i}: stream {g.tolist()} != predict {e.tolist()}"
    with h5py.File(summary["output"]) as f:  # one row per frame, in frame order: nothing lost or doubled
        assert np.array_equal(f["/entry_1/result_1/frameIndex"][()], np.arange(len(expected)))


def assert_shut_down(summary, timeout=20.0):
    """Every actor of the run is gone and its resources are back; Ray itself is still up (not ours)."""
    pids = [p for a in summary["actors"] for p in a["pids"]]
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for p in pids:
            try:
                os.kill(p, 0)
                alive.append(p)
            except ProcessLookupError:
                pass
        if not alive and ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            break
        time.sleep(0.2)
    assert not alive, f"actor processes {alive} still alive after the run"
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert ray.is_initialized() and summary["ray_started_by_pipeline"] is False


def test_stream_equals_predict_with_two_actors_and_a_frame_cap(model_run, reference, ray_local, tmp_path):
    from vitkit.apps.peaks.stream.ray import run_stream

    cap = 12
    s = run_stream(stream_cfg(model_run, tmp_path, "model.num_actors=2", "model.batch_size=4",
                              f"max_frames_in_flight={cap}"), log=None)
    assert_same_peaks(s, reference)
    assert s["frames_written"] == s["rows"] == N and s["peaks"] == sum(len(p) for p in reference)
    assert all(a["batches"] > 0 for a in s["actors"]), s["actors"]  # both actors worked
    from vitkit.apps.peaks.finder import choose_sparse

    assert s["model"] == ("sparse" if choose_sparse(model_run)[0] else "dense")  # what vitkit predict runs
    # backpressure: the cap is reached (the source is faster than the model) and never exceeded
    assert s["max_frames_in_flight_seen"] == cap
    assert s["max_queue_depths"]["batches_per_actor"] <= 2 and s["max_queue_depths"]["peak_calls"] <= 2
    assert s["max_reorder_buffer"] <= cap
    assert 0 < s["latency_s"]["p50"] <= s["latency_s"]["p95"] and s["frames_per_s"] > 0
    # compact results: bit-packed masks + peak lists, far below float32 logits [2, H, W]
    ob = s["object_store_bytes"]
    assert ob["float32_logits_per_frame"] == 2 * SHAPE[0] * SHAPE[1] * 4
    assert ob["masks"] == N * SHAPE[0] * SHAPE[1] // 8
    assert ob["results_per_frame"] < ob["float32_logits_per_frame"] / 16
    on_disk = json.loads((tmp_path / "stream_stats.json").read_text())
    assert on_disk["frames_written"] == N and on_disk["output"] == s["output"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peaks.cxi", "stream_stats.json"]  # no temp files
    assert_shut_down(s)


def test_killed_actor_restarts_and_its_batches_rerun_without_loss_or_duplicates(model_run, reference, ray_local,
                                                                              tmp_path):
    """The process of one of two actors is killed (SIGKILL) with a batch in flight; its batches go to the other
    actor, it is restarted by Ray and works again. (ray.kill of the only actor: the CLI test below.)"""
    from stream_faults import run_with_kill

    s = run_with_kill(stream_cfg(model_run, tmp_path, "model.num_actors=2", "model.batch_size=4",
                                 "max_frames_in_flight=16"), after_batches=2, mode="sigkill", log=None)
    assert_same_peaks(s, reference)
    f = s["fault_injected"]
    assert f is not None and f["mode"] == "sigkill" and f["batches_in_flight"]
    assert s["actor_deaths"] == 1 and s["actor_restarts"] == 1
    assert set(f["batches_in_flight"]) <= set(s["rerun_batches"])  # what the dead actor held was re-run
    killed = s["actors"][f["actor"]]
    assert killed["deaths"] == 1 and len(killed["pids"]) == 2 and killed["state"] == "alive"
    assert s["rows"] == N and s["duplicates_dropped"] == 0
    assert_shut_down(s)


def test_queue_source_with_two_producers_their_sentinels_and_a_duplicate(model_run, reference, ray_local, tmp_path):
    from ray.util.queue import Queue

    from vitkit.apps.peaks.stream.ray import run_stream

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # producers defined in this test module

    @ray.remote(num_cpus=0)
    def producer(q, items):
        for item in items:
            q.put(item)  # blocks while the queue is full: backpressure from the pipeline
        q.put(None)  # this producer's end of stream
        return len(items)

    n = 16
    ds = SyntheticPeakDataset(N, SynthConfig(shape=SHAPE), seed=SEED)
    frames = [ds[i]["image"].numpy()[0] for i in range(n)]
    q = Queue(maxsize=4, actor_options={"name": "vitkit-test-frames"})  # found by name, as `vitkit stream` does
    evens = [{"index": i, "image": frames[i]} for i in range(0, n, 2)]
    odds = [(i, frames[i]) for i in range(1, n, 2)] + [(5, frames[5])]  # frame 5 sent twice
    jobs = [producer.remote(q, evens), producer.remote(q, odds)]
    cfg = load_stream_config("default", [f"model.checkpoint={model_run}", f"output.dir={tmp_path}", *RES,
                                         "source.kind=queue", "source.queue_name=vitkit-test-frames",
                                         "source.num_producers=2", "model.num_actors=1", "model.batch_size=2",
                                         "max_frames_in_flight=6"])
    s = run_stream(cfg, log=None)
    assert ray.get(jobs) == [8, 9]
    assert_same_peaks(s, reference[:n])
    assert s["frames_read"] == n + 1 and s["duplicates_dropped"] == 1 and s["max_frames_in_flight_seen"] <= 6
    q.shutdown()
    assert_shut_down(s)


def test_a_bad_item_midway_ends_the_run_with_its_error_and_cleans_up(model_run, reference, ray_local, tmp_path):
    from ray.util.queue import Queue

    from vitkit.apps.peaks.stream.ray import run_stream

    ds = SyntheticPeakDataset(N, SynthConfig(shape=SHAPE), seed=SEED)
    q = Queue()
    for i in range(4):
        q.put((i, ds[i]["image"].numpy()[0]))
    q.put(ds[4]["image"].numpy()[0])  # no index after indexed items
    cfg = load_stream_config("default", [f"model.checkpoint={model_run}", f"output.dir={tmp_path}", *RES,
                                         "source.kind=queue", "model.batch_size=2", "max_frames_in_flight=4"])
    with pytest.raises(InputError, match="some items carry a frame index and some do not"):
        run_stream(cfg, queue=q, log=None)
    q.shutdown()
    deadline = time.time() + 20
    while time.time() < deadline and ray.available_resources().get("CPU") != 2:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2  # the actor is gone
    assert list(tmp_path.iterdir()) == []  # no CXI, no temporary file


@pytest.fixture(scope="module")
def small_geom(tmp_path_factory):
    """A 4-panel detector (64 x 96 panels around the beam) as a .geom file."""
    from vitkit.apps.peaks.detector import Detector, Panel
    from vitkit.apps.peaks.geom import write_geom

    corners = [(-100.0, -70.0), (4.0, -70.0), (-100.0, 6.0), (4.0, 6.0)]
    det = Detector([Panel(f"p{k}", 0, 95, 64 * k, 64 * k + 63, corner_x=cx, corner_y=cy, index=k)
                    for k, (cx, cy) in enumerate(corners)], photon_energy=9500.0, clen=0.1, adu_per_photon=1.0)
    return write_geom(det, tmp_path_factory.mktemp("geom") / "small.geom")


def test_multi_panel_events_stream_as_predict_finds_them(model_run, ray_local, small_geom, tmp_path):
    """Whole 4-panel events (an HDF5 of psana stacks [N, 4, 64, 96]) through 2 actors (the panels of 2 events
    per call) equal `vitkit predict` with the same geometry and mask: rows in arrival order with event ids, slab
    coordinates, detector.geom beside the CXI."""
    from vitkit.apps.peaks.finder import PeakFinder
    from vitkit.apps.peaks.geom import read_geom
    from vitkit.apps.peaks.job import predict
    from vitkit.apps.peaks.stream.ray import run_stream

    n = 12
    ds = SyntheticPeakDataset(4 * n, SynthConfig(shape=SHAPE), seed=SEED)  # frames the model knows, as panels
    events = np.stack([ds[i]["image"].numpy()[0] for i in range(4 * n)]).reshape(n, 4, *SHAPE)
    with h5py.File(tmp_path / "run.h5", "w") as f:
        f["/entry_1/data_1/data"] = events
    good = np.ones((4, *SHAPE), dtype=bool)
    good[2, :, :48] = False  # half of panel 2 masked
    np.save(tmp_path / "mask.npy", good)
    finder = PeakFinder.from_run(model_run, geometry=small_geom, mask=tmp_path / "mask.npy")
    ref = predict(finder, events, tmp_path / "pred", overlays=0, progress=False)["peaks"]
    assert sum(len(t) for t in ref) > 100 and {int(p) for t in ref for p in t["panel"]} == {0, 1, 2, 3}
    assert not any(((t["panel"] == 2) & (t["fs"] < 47.5)).any() for t in ref)
    s = run_stream(load_stream_config("default", [
        f"model.checkpoint={model_run}", f"output.dir={tmp_path / 'out'}", *RES, "source.kind=files",
        f"source.path={tmp_path / 'run.h5'}", f"detector.geometry={small_geom}",
        f"detector.mask={tmp_path / 'mask.npy'}", "model.num_actors=2", "model.batch_size=2",
        "max_frames_in_flight=6"]), log=None)
    assert_same_peaks(s, read_cxi_peaks(tmp_path / "pred" / "peaks.cxi"))
    with h5py.File(s["output"]) as f:
        ids = [x.decode() for x in f["/entry_1/event_id"][()]]
        assert ids == [f"frame {i} of {tmp_path / 'run.h5'}" for i in range(n)]
        assert np.isnan(f["/entry_1/timestamp"][()]).all()
    assert read_geom(tmp_path / "out" / "detector.geom").stack_shape == (4, *SHAPE)
    assert s["object_store_bytes"]["frame_shapes"] == [[4, *SHAPE]]
    assert s["object_store_bytes"]["masks"] == n * 4 * SHAPE[0] * SHAPE[1] // 8
    # every stage's busy time is counted; the limiting stage is named with its reason
    assert set(s["stages"]) == {"read", "batch", "driver", "model", "peaks", "write"}
    assert s["stages"]["model"]["busy_s"] > 0 and s["stages"]["model"]["workers"] == 2
    assert s["limiting_stage"]["stage"] in s["stages"] and s["limiting_stage"]["why"]
    assert_shut_down(s)


def test_actor_finder_is_predicts_finder_and_bf16_stays_close(model_run, tmp_path):
    """The model actors' finder (the run's model-less template + the model) computes `vitkit predict`'s masks;
    the peak tasks' model-less finder turns them into predict's tables."""
    import torch

    from vitkit.apps.peaks.job import PeakFinder, load_model
    from vitkit.apps.peaks.stream.stages import actor_finder

    ds = SyntheticPeakDataset(N, SynthConfig(shape=SHAPE), seed=SEED)
    frames = np.stack([ds[i]["image"].numpy()[0] for i in range(3)])[:, None]  # 3 one-panel events
    ref = PeakFinder(load_model(model_run))
    ref_masks, ref_peaks = ref.find(frames)
    assert ref_masks.sum() > 20
    template = PeakFinder(None)
    with pytest.raises(InputError, match="has no model"):
        template.masks(frames)
    fp32 = actor_finder(template, model_run)
    masks = fp32.masks(frames)
    assert np.array_equal(masks, ref_masks)
    got = template.peaks(frames, masks)
    assert len(got) == 3 and all(a.tobytes() == b.tobytes() for a, b in zip(got, ref_peaks))  # NaN lab x/y too
    assert template.model is None  # the template is not changed by the actor's copy
    bf16 = actor_finder(template, model_run, bf16=True)
    assert bf16.model.encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16  # cast once, not autocast
    m16 = bf16.masks(frames)
    assert (m16 & ref_masks).sum() / (m16 | ref_masks).sum() > 0.8  # IoU with the fp32 masks
    # model.sparse: the template carries the run's sparse threshold, the actor loads the run's sparse model
    from vitkit.apps.peaks.finder import sparse_of_run

    assert stream_cfg(model_run, "o").model.sparse is None  # the default: as vitkit predict decides
    assert stream_cfg(model_run, "o", "model.sparse=true").model.sparse is True
    model_dir, threshold = sparse_of_run(model_run)
    sparse_template = PeakFinder(None, sparse_threshold=threshold)
    sp = actor_finder(sparse_template, model_dir)
    assert np.array_equal(sp.masks(frames), PeakFinder.from_run(model_run, sparse=True).masks(frames))
    assert 0 < sp.kept_tokens[0] < sp.kept_tokens[1] and sparse_template.kept_tokens == [0, 0]


def test_missing_inputs_and_resources_fail_before_any_actor_starts(model_run, ray_local, tmp_path):
    from vitkit.apps.peaks.io import FramesNotFoundError
    from vitkit.apps.peaks.stream import StreamError
    from vitkit.apps.peaks.stream.ray import run_stream

    with pytest.raises(FramesNotFoundError, match="nope.zarr"):
        run_stream(stream_cfg(model_run, tmp_path, "source.kind=files", f"source.path={tmp_path / 'nope.zarr'}"),
                   log=None)
    with pytest.raises(FileNotFoundError, match="model.checkpoint"):
        run_stream(stream_cfg(tmp_path / "no_run", tmp_path), log=None)
    with pytest.raises(StreamError, match="needs 6 Ray CPUs .* the cluster has 2"):
        run_stream(stream_cfg(model_run, tmp_path, "model.num_actors=4", "model.num_cpus=1", "peaks.num_cpus=1"),
                   log=None)
    assert ray.available_resources().get("CPU") == 2 and not (tmp_path / "peaks.cxi").exists()


def test_cli_streams_a_zarr_file_survives_ray_kill_of_its_only_actor_and_owns_its_ray(model_run, tmp_path):
    """`vitkit stream` end to end: zarr source, progress lines, summary JSON, a Ray it starts and shuts down, and
    `ray.kill(actor, no_restart=False)` of its only actor: batches wait for the restart and are re-run."""
    import stream_faults
    from vitkit.apps.peaks.job import PeakFinder, predict

    ds = SyntheticPeakDataset(12, SynthConfig(shape=SHAPE), seed=SEED + 1)
    frames = np.stack([ds[i]["image"].numpy()[0] for i in range(12)])
    write_zarr(tmp_path / "frames.zarr", frames)
    predict(PeakFinder.from_run(model_run), frames, tmp_path / "pred", overlays=0, progress=False)
    out = tmp_path / "out"
    res = run_cli("stream", "default", f"model.checkpoint={model_run}", "source.kind=files",
                  f"source.path={tmp_path / 'frames.zarr'}", f"output.dir={out}", "ray.num_cpus=2",
                  "model.num_cpus=0.5", "peaks.num_cpus=0.5", "model.batch_size=2", "report_every_s=0.05",
                  pre=stream_faults.pre_code(after_batches=2, mode="ray_kill"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(out)
    progress = [line for line in res.stderr.splitlines() if line.startswith("[stream ")]
    assert progress and all("frames/s" in line and "queues:" in line and "in_flight" in line for line in progress)
    assert "[stream] done: 12 frames" in res.stderr
    s = json.loads((out / "stream_stats.json").read_text())
    assert s["ray_started_by_pipeline"] is True and s["frames_written"] == 12
    assert s["latency_s"]["p95"] is not None
    assert s["actor_restarts"] == 1 and s["fault_injected"]["mode"] == "ray_kill"
    assert set(s["fault_injected"]["batches_in_flight"]) <= set(s["rerun_batches"])
    assert "restarted (pid" in res.stderr and "1 actor restarts" in res.stdout
    a, b = read_cxi_peaks(out / "peaks.cxi"), read_cxi_peaks(tmp_path / "pred" / "peaks.cxi")
    assert len(a) == 12 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_report_lines_show_rates_latency_and_queue_depths():
    from vitkit.apps.peaks.stream.stats import StreamStats

    st = StreamStats()
    for lat in (0.1, 0.2, 0.3, 0.4):
        st.frame_written(lat)
    line = st.report_line({"source": 3, "in_flight": "4/8"})
    assert "4 frames written" in line and "p50 0.250 s" in line and "p95 0.385 s" in line
    assert "queues: source 3 | in_flight 4/8" in line


# ------------------------------------------------------------------------------------------- zmq source
def free_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_zmq_source_multi_panel_malformed_messages_and_a_killed_actor(model_run, ray_local, small_geom, tmp_path):
    """4-panel events over a PUSH socket, three malformed messages among them (garbage, wrong shape, complex
    dtype): the bad ones are counted and logged with their event ids, the stream goes on; one of two actors is
    SIGKILLed with a batch in flight and nothing is lost or doubled: the CXI equals `vitkit predict` on the good
    events, in arrival order, with the producer's ids and timestamps."""
    import threading

    import zmq

    from stream_faults import run_with_kill
    from vitkit.apps.peaks.finder import PeakFinder
    from vitkit.apps.peaks.job import predict
    from vitkit.apps.peaks.stream.producer import encode_event

    n = 16
    ds = SyntheticPeakDataset(4 * n, SynthConfig(shape=SHAPE), seed=SEED + 2)
    events = np.stack([ds[i]["image"].numpy()[0] for i in range(4 * n)]).reshape(n, 4, *SHAPE)
    bad = {3: [b"not an npz at all"],
           7: encode_event(np.zeros((3, *SHAPE), np.float32), "bad-shape"),
           11: encode_event(np.zeros((4, *SHAPE), np.complex64), "bad-dtype", fmt="raw")}
    endpoint = free_endpoint()
    sent = []

    def producer():
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 2)
        sock.bind(endpoint)
        k = 0
        for i in range(n):
            if i in bad:
                sock.send_multipart(bad.pop(i))
            sock.send_multipart(encode_event(events[i].astype(np.uint16) if i % 2 else events[i], f"r7:{i}",
                                             1000.0 + i, fmt="raw" if i % 3 == 0 else "npz"))
            sent.append(f"r7:{i}")
            k += 1
        sock.send_multipart([b""])
        sock.close(linger=10_000)
        ctx.term()

    # uint16 events lose their fractions: the reference is what the stream receives
    events = np.stack([np.floor(e).astype(np.uint16).astype(np.float32) if i % 2 else e
                       for i, e in enumerate(events)])
    predict(PeakFinder.from_run(model_run, geometry=small_geom), events, tmp_path / "pred", overlays=0, progress=False)
    t = threading.Thread(target=producer, daemon=True)
    t.start()
    lines: list[str] = []
    s = run_with_kill(load_stream_config("default", [
        f"model.checkpoint={model_run}", f"output.dir={tmp_path / 'out'}", *RES, "source.kind=zmq",
        f"source.endpoints={endpoint}", f"detector.geometry={small_geom}", "model.num_actors=2",
        "model.batch_size=2", "max_frames_in_flight=6"]), after_batches=2, mode="sigkill", log=lines.append)
    t.join(30)
    assert not t.is_alive() and sent == [f"r7:{i}" for i in range(n)]
    assert_same_peaks(s, read_cxi_peaks(tmp_path / "pred" / "peaks.cxi"))
    with h5py.File(s["output"]) as f:
        assert [x.decode() for x in f["/entry_1/event_id"][()]] == sent
        assert np.array_equal(f["/entry_1/timestamp"][()], 1000.0 + np.arange(n))
    assert s["messages_malformed"] == 3 and s["source"]["malformed_ids"] == [None, "bad-shape", "bad-dtype"]
    assert s["source"]["accepted"] == n and s["events_dropped"] == 0
    logged = [ln for ln in lines if ln.startswith("[stream] zmq: malformed message")]
    assert len(logged) == 3 and "'bad-shape'" in logged[1] and "(3, 64, 96)" in logged[1]
    assert "'bad-dtype'" in logged[2] and "complex" in logged[2]
    assert s["actor_deaths"] == 1 and s["actor_restarts"] == 1 and s["duplicates_dropped"] == 0
    assert set(s["fault_injected"]["batches_in_flight"]) <= set(s["rerun_batches"])
    assert {"receive", "decode", "batch", "driver", "model", "peaks", "write"} == set(s["stages"])
    assert_shut_down(s)


def run_soak(model_run, tmp_path, n: int, *extra: str, rate_hz: float | None = None):
    """`vitkit stream` (a subprocess with its own Ray) fed `n` single-panel events over zmq by a producer thread
    that sends as fast as the socket takes them (or at `rate_hz`). Returns (stats, producer result, stderr)."""
    import threading

    from vitkit.apps.peaks.stream.producer import produce

    ds = SyntheticPeakDataset(8, SynthConfig(shape=SHAPE), seed=SEED)
    pool = [ds[i]["image"].numpy()[0] for i in range(8)]
    endpoint = free_endpoint()
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(produce(
        endpoint, ((f"soak:{i}", pool[i % 8]) for i in range(n)), hwm=4, rate_hz=rate_hz, send_timeout_s=300)),
        daemon=True)
    t.start()
    out = tmp_path / "out"
    res = run_cli("stream", "default", f"model.checkpoint={model_run}", "source.kind=zmq",
                  f"source.endpoints={endpoint}", f"output.dir={out}", "ray.num_cpus=2", "model.num_actors=2",
                  "model.num_cpus=0.5", "peaks.num_cpus=0.5", "model.batch_size=8", "max_frames_in_flight=32",
                  "report_every_s=2", *extra, "--report", timeout=600)
    t.join(60)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not t.is_alive() and result["sent"] == n
    return json.loads((out / "stream_stats.json").read_text()), result, res


def test_zmq_soak_blocks_the_sender_keeps_memory_bounded_and_ends_with_the_producer(model_run, tmp_path):
    """1,000 events pushed faster than 2 actors can take them: the pipeline never holds more than its cap, the
    sender is held back (it spends most of its time blocked), every event is written exactly once, the driver's
    peak RSS stays under 1.5 GiB, and the run ends when the producer's end marker arrives. (The 10,000-event
    soak is benchmarks/stream.py --soak; its numbers are in benchmarks/RESULTS.md.)"""
    n = 1000
    s, sent, res = run_soak(model_run, tmp_path, n)
    assert s["frames_written"] == s["rows"] == n and s["events_dropped"] == 0 and s["duplicates_dropped"] == 0
    assert s["max_frames_in_flight_seen"] <= 32 and s["source"]["end_markers"] == 1
    assert sent["blocked_s"] > 0.3 * sent["seconds"]  # backpressure: the socket was not read while full
    assert s["peak_rss_mib"]["driver"] < 1536 and all(0 < m < 2048 for m in s["peak_rss_mib"]["model_actors"])
    with h5py.File(s["output"]) as f:
        assert [x.decode() for x in f["/entry_1/event_id"][()]] == [f"soak:{i}" for i in range(n)]
    assert "limiting stage: " in res.stdout and s["limiting_stage"]["stage"] in ("model", "peaks", "driver")
    progress = [ln for ln in res.stderr.splitlines() if ln.startswith("[stream ")]
    assert progress and all("busy: " in ln and "dropped 0" in ln for ln in progress)


def test_zmq_drop_oldest_counts_every_event_it_drops(model_run, ray_local, tmp_path):
    """Live-monitoring policy: the socket is read on while the pipeline is full and the oldest waiting events
    are dropped: written + dropped = sent, the drops are warned about, nothing is written twice."""
    import threading

    from vitkit.apps.peaks.stream.producer import produce
    from vitkit.apps.peaks.stream.ray import run_stream

    n = 300
    ds = SyntheticPeakDataset(8, SynthConfig(shape=SHAPE), seed=SEED)
    pool = [ds[i]["image"].numpy()[0] for i in range(8)]
    endpoint = free_endpoint()
    sent: dict = {}
    t = threading.Thread(target=lambda: sent.update(produce(
        endpoint, ((f"soak:{i}", pool[i % 8]) for i in range(n)), hwm=4, send_timeout_s=120)), daemon=True)
    t.start()
    lines: list[str] = []
    s = run_stream(load_stream_config("default", [
        f"model.checkpoint={model_run}", f"output.dir={tmp_path}", *RES, "source.kind=zmq",
        f"source.endpoints={endpoint}", "source.overflow=drop_oldest", "source.buffer_events=8",
        "model.num_actors=2", "model.batch_size=8", "max_frames_in_flight=16"]), log=lines.append)
    t.join(60)
    assert not t.is_alive() and sent["sent"] == n
    assert s["events_dropped"] > 0 and s["frames_written"] + s["events_dropped"] == n
    assert s["duplicates_dropped"] == 0 and any("dropping the oldest waiting events" in ln for ln in lines)
    with h5py.File(s["output"]) as f:
        ids = [int(x.decode().split(":")[1]) for x in f["/entry_1/event_id"][()]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[-1] == n - 1  # the newest survive
    assert_shut_down(s)
