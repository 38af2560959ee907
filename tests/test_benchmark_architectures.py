"""benchmarks/architectures.py (issue 16): its data reproduces the job's crops, its dense models meet PeakFinder's
model contract, and a tiny end-to-end run writes the table, JSON and plot (and says why rows were skipped)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import load_benchmark

A = load_benchmark("architectures")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread (no OpenMP spinning on a loaded machine); main()'s process setup only sets threads here
    (its allocator tuning would outlive the test)."""
    n = torch.get_num_threads()
    monkeypatch.setattr(A.common, "setup_process", lambda threads, **kw: torch.set_num_threads(threads))
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cfg():
    from vitkit.apps.peaks.job import compose

    return compose([])


def test_pool_crops_are_the_data_modules_crops(cfg):
    """Panels prepared once and cropped by the pool == CropDataset over the same panels, key by key (2 epochs)."""
    from omegaconf import OmegaConf

    from vitkit.apps.peaks.datamodule import CropDataset, PeakDataModule
    from vitkit.apps.peaks.peakfind import LONE_PIXEL_RATIO

    data = {**OmegaConf.to_container(cfg.data, resolve=True), "batch_size": 2}
    n, seed = 3, 5
    pool = A.PanelPool(data, seed, n, progress=False)
    dm = PeakDataModule(**{**data, "seed": seed, "num_train": n})
    ref = CropDataset(dm.frames("train"), tuple(data["crop"]), data["polar_crop_sigma"], seed, data["peak_bias"], True,
                      detector=dm.detector, lone_pixel_ratio=LONE_PIXEL_RATIO, negative_bias=data["negative_bias"])
    for key in range(2 * n):
        a, b = pool.crop(key), ref[key]
        for k in ("image", "label", "valid"):
            assert torch.equal(a[k], b[k]), (key, k)
    batch = next(pool.batches())
    assert batch["image"].shape == (2, 1, *data["crop"]) and batch["label"].dtype == torch.int64
    with pytest.raises(ValueError, match="batch"):  # fewer panels than a batch: the loader would yield nothing
        A.PanelPool(data, seed, 1, progress=False)


def test_dense_wrapper_meets_the_peakfinder_contract(cfg):
    """PeakFinder's class scores of a wrapped one-logit model are (1 - sigmoid(z), sigmoid(z)) exactly."""
    from vitkit.apps.peaks.finder import PeakFinder
    from vitkit.tasks.postprocess import semantic_inference

    net = torch.nn.Conv2d(1, 1, 1)  # pointwise, so window overlaps average identical values
    with torch.no_grad():
        net.weight.fill_(3.0)
        net.bias.fill_(-9.0)
    model = A.DenseAsEoMT(net, (64, 64)).eval()
    x = torch.randn(2, 1, 100, 90) * 3
    probs = semantic_inference(model, x, overlap=0.25)
    z = net(x)[:, 0]
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(z), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs[:, 0] + probs[:, 1], torch.ones_like(z), rtol=0, atol=1e-6)
    ev = np.abs(np.random.default_rng(0).normal(size=(2, 1, 70, 80))).astype(np.float32)
    ev[:, 0, 30:33, 40:43] = 500.0  # one bright spot per frame: the thresholding "model" finds it
    masks, tables = PeakFinder(model, None).find(ev[:, 0])
    assert [len(t) for t in tables] == [1, 1]
    assert abs(float(tables[0]["ss"][0]) - 31) < 0.5 and abs(float(tables[0]["fs"][0]) - 41) < 0.5


def test_quick_run_writes_the_report(tmp_path):
    doc = A.main(["--quick", "--rows", "vit_tiny_sfp,eomt_s16_dinov2,eomt_tiny_ssl", "--budgets", "0.01",
                  "--panels", "8", "--threads", "1", "--out", str(tmp_path)])
    for f in ("architectures.md", "architectures.json", "architectures.png"):
        assert (tmp_path / f).exists(), f
    rows = json.loads((tmp_path / "architectures.json").read_text())["rows"]
    assert rows["vit_tiny_sfp"]["status"] == "ok"
    assert rows["vit_tiny_sfp"]["flops_per_panel"] > 0 and rows["vit_tiny_sfp"]["panels_per_s"] > 0
    assert rows["eomt_tiny_ssl"]["status"].startswith("skipped: not tried")
    assert rows["eomt_s16_dinov2"]["status"].startswith("skipped") or rows["eomt_s16_dinov2"]["status"] == "ok"
    s = doc["summary"][0]
    assert s["row"] == "vit_tiny_sfp" and s["seeds"] == 1 and 0.0 <= s["peak_f1"]["mean"] <= 1.0
    assert "skipped" in (tmp_path / "architectures.md").read_text()
