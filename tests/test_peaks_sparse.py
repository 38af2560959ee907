"""Sparse-token peak finding (vitkit.apps.peaks.sparse, PeakFinder(sparse_threshold=...)).

EoMT's own sparse path (padding, RoPE, the tile decoder) is tested in test_eomt.py; here: the spot evidence and
which tokens it keeps, the threshold's fit, the stitching of tiles into panel scores, the finder's sparse path
(the dense one when it keeps every token), the fine-tune, and a run's sparse model and its errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.apps.peaks.finder import PeakFinder, choose_sparse, sparse_of_run
from vitkit.apps.peaks.lattice import LatticeStillsDataset
from vitkit.apps.peaks.sparse import fine_tune_sparse, fit_threshold, spot_evidence, window_masks
from vitkit.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from vitkit.tasks.postprocess import semantic_inference, semantic_probs, sparse_semantic_inference, token_keep


def _model(seed=0):
    torch.manual_seed(seed)
    model = vitkit.EoMT(backbone="dinov2_vits14_reg", embed_dim=32, depth=3, num_heads=4, img_size=(64, 64),
                        in_chans=1, patch_size=8, num_classes=2, num_q=4, num_blocks=1, mask_stride=1,
                        upscale_dims=[16, 8, 8]).eval()
    model.attn_mask_probs.zero_()
    return model


@pytest.fixture(scope="module")
def shots():
    # 4 items of 2 simulated epix10k2M panels each: a finder without a detector sees 8 one-panel events
    return LatticeStillsDataset(4, "epix10k2m", seed=3, panels_per_item=2)


@pytest.mark.parametrize("shape", [(2, 1, 40, 57), (1, 1, 9, 5), (3, 1, 1, 20)])
def test_spot_evidence_is_the_3x3_minus_the_15x15_mean_inside_the_panel(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3

    def mean(k):
        return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)

    torch.testing.assert_close(spot_evidence(x), mean(3) - mean(15), atol=1e-5, rtol=1e-5)
    spot = torch.zeros(1, 1, 31, 31)
    spot[..., 14:17, 14:17] = 9.0  # a 3 x 3 spot of 9 on a flat panel: its middle has 9 - 81 / 225
    e = spot_evidence(spot)
    assert e[0, 0, 15, 15].item() == pytest.approx(9.0 - 81.0 / 225)
    assert e[0, 0, :6, :6].abs().max() < 1e-6  # out of its 15 x 15 reach: no contrast at all


def test_token_keep_reads_each_patch_with_a_one_pixel_border():
    ev = torch.full((1, 1, 18, 26), float("-inf"))  # a 16 x 24 window (2 x 3 patches of 8) with its margin
    ev[0, 0, 1:-1, 1:-1] = 0.0
    ev[0, 0, 1 + 3, 1 + 7] = 5.0  # last column of patch (0, 0): keeps it and its right neighbour (0, 1)
    keep = token_keep(ev, 8, 1.0)
    assert keep.tolist() == [[[True, True, False], [False, False, False]]]
    ev[0, 0, 0, 1 + 20] = 5.0  # in the margin above patch (0, 2): the window's surroundings count too
    assert token_keep(ev, 8, 1.0)[0, 0, 2]
    assert not token_keep(ev, 8, 5.0).any()  # strictly above the threshold


def test_fit_threshold_keeps_the_asked_share_of_the_dense_finders_peak_tokens(shots, monkeypatch):
    finder = PeakFinder(_model(), min_pixels=1)
    order = iter(range(len(shots)))  # the "dense finder" here finds exactly the labelled peak pixels
    monkeypatch.setattr(finder, "_masks", lambda ev, g: (np.asarray(shots[next(order)]["label"]) > 0)
                        .reshape(ev.shape))
    stats = fit_threshold(finder, shots, recall=0.99)
    assert stats["recall"] >= 0.99 and 0 < stats["positive_fraction"] < 0.05
    assert stats["positive_fraction"] < stats["kept_fraction"] < 0.5  # keeps the peaks, drops most of the rest
    assert stats["tokens"] == len(shots) * 2 * 44 * 48
    order = iter(range(len(shots)))
    strict = fit_threshold(finder, shots, recall=0.999)
    assert strict["threshold"] <= stats["threshold"] and strict["kept_fraction"] >= stats["kept_fraction"]
    monkeypatch.setattr(finder, "_masks", lambda ev, g: np.zeros(ev.shape, dtype=bool))
    with pytest.raises(ConfigError, match="finds no peak"):
        fit_threshold(finder, shots)
    with pytest.raises(ConfigError, match="recall must be"):
        fit_threshold(finder, shots, recall=1.5)
    with pytest.raises(ConfigError, match="dense PeakFinder"):
        fit_threshold(PeakFinder(_model(), sparse_threshold=0.0), shots)


def test_sparse_finder_keeping_everything_is_the_dense_finder(shots):
    model = _model(seed=1)
    ev = np.asarray(shots[0]["image"])[:, 0] * 40.0  # two one-panel events of 352 x 384: overlapping windows
    ev[:, 100:103, 200:203] += 3000.0
    dense = PeakFinder(model, min_pixels=1)
    everything = PeakFinder(model, min_pixels=1, sparse_threshold=float("-inf"))
    m_dense, t_dense = dense.find(ev)
    m_sparse, t_sparse = everything.find(ev)
    assert np.array_equal(m_dense, m_sparse)
    for a, b in zip(t_dense, t_sparse):
        assert len(a) == len(b)
        np.testing.assert_allclose(a["fs"], b["fs"], atol=1e-4)
    assert everything.kept_tokens[0] == everything.kept_tokens[1] > 0

    nothing = PeakFinder(model, sparse_threshold=float("inf"))
    masks, tables = nothing.find(ev)
    assert not masks.any() and all(len(t) == 0 for t in tables) and nothing.kept_tokens[0] == 0


def test_sparse_scores_are_the_tiles_of_the_kept_tokens_and_zero_elsewhere():
    model = _model(seed=2)
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64, 64)
    evidence = torch.zeros(1, 1, 64, 64)
    evidence[..., 20, 30] = 4.0  # inside patch (2, 3), one pixel from nothing else: keeps that patch only
    evidence[..., 47, 8] = 4.0  # on the border of patches (5, 0), (5, 1) and their neighbours below
    scores, kept, total = sparse_semantic_inference(model, x, evidence, 1.0)
    keep = token_keep(F.pad(evidence, (1, 1, 1, 1), value=float("-inf")), 8, 1.0)
    assert (kept, total) == (int(keep.sum()), 64) and kept == 5
    with torch.no_grad():
        tiles, classes, where = model.forward_sparse(x, keep)
    masks, computed = window_masks(model, tiles, where, (1, 64, 64))
    ref = semantic_probs(masks, classes)  # one window: no averaging
    torch.testing.assert_close(scores[:, :, computed[0]], ref[:, :, computed[0]])
    assert not scores[:, :, ~computed[0]].any() and scores[:, :, computed[0]].sum() > 0
    # every token kept: the dense sliding-window scores, overlaps averaged the same way
    img = torch.randn(2, 1, 100, 130)
    dense = semantic_inference(model, img)
    every, kept, total = sparse_semantic_inference(model, img, torch.ones(2, 1, 100, 130), 0.0)
    torch.testing.assert_close(every, dense, atol=1e-5, rtol=1e-4)
    assert kept == total > 0


def test_fine_tune_lowers_the_sparse_loss_and_leaves_the_model_alone(shots):
    from vitkit.apps.peaks.datamodule import CropDataset

    model = _model(seed=3)
    crops = CropDataset(LatticeStillsDataset(8, "epix10k2m", seed=4, panels_per_item=1), (64, 64), peak_bias=1.0)
    loader = torch.utils.data.DataLoader(crops, batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, info = fine_tune_sparse(model, loader, threshold=1.0, steps=40, lr=2e-3, log_every=0)
    assert info["steps"] == 40 and info["loss_last"] < 0.8 * info["loss_first"], info
    assert 0 < info["kept_fraction"] < 0.6 and not tuned.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # a copy was trained
    assert any(not torch.equal(v, tuned.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="steps must be positive"):
        fine_tune_sparse(model, loader, threshold=1.0, steps=0)


def test_a_runs_sparse_model_and_threshold(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(CheckpointNotFoundError, match="no sparse-token model"):
        sparse_of_run(run)
    model = _model(seed=4)
    model.save_pretrained(run / "model")
    model.save_pretrained(run / "sparse_model")
    (run / "sparse.json").write_text(json.dumps({"kept_fraction": 0.1}))
    with pytest.raises(CheckpointError, match="no numeric 'threshold'"):
        PeakFinder.from_run(run, sparse=True)
    (run / "sparse.json").write_text(json.dumps({"threshold": 0.75}))
    assert sparse_of_run(run) == (run / "sparse_model", 0.75)
    finder = PeakFinder.from_run(run, sparse=True, min_pixels=1)
    assert finder.sparse and finder.sparse_threshold == 0.75 and finder.min_pixels == 1
    # no held-out comparison (a run from before it was made): the dense model unless asked
    assert not PeakFinder.from_run(run).sparse and not PeakFinder.from_run(run, sparse=False).sparse
    assert "no held-out comparison" in choose_sparse(run)[1]


@pytest.mark.parametrize("sparse_f1, device, default", [(0.955, "cpu", True), (0.940, "cpu", False),
                                                        (0.955, "cuda", False), (0.970, "cuda:1", False)])
def test_the_sparse_model_is_the_default_where_it_held_the_accuracy(tmp_path, sparse_f1, device, default):
    """`vitkit train` records in sparse.json whether the sparse-token model held the accuracy on the held-out shots
    (peak F1 within max_f1_drop of the dense model's); without --sparse/--dense that decides, on a CPU only."""
    run = tmp_path / "run"
    _model(seed=4).save_pretrained(run / "model")
    _model(seed=5).save_pretrained(run / "sparse_model")
    held = {"frames": 24, "dense_peak_f1": 0.961, "sparse_peak_f1": sparse_f1, "max_f1_drop": 0.01,
            "default": sparse_f1 >= 0.961 - 0.01}
    (run / "sparse.json").write_text(json.dumps({"threshold": 0.75, "held_out": held}))
    use, why = choose_sparse(run, None, device)
    assert use is default
    assert (f"F1 {sparse_f1:.4f} vs dense 0.9610" in why) and ("--dense" if use else "--sparse") in why
    assert choose_sparse(run, True, device)[0] and not choose_sparse(run, False, device)[0]  # the flags decide
    if device == "cpu":
        finder = PeakFinder.from_run(run)
        assert finder.sparse is default and (finder.sparse_threshold == 0.75) is default
        sparse_q = vitkit.EoMT.from_pretrained(run / "sparse_model").q.weight
        assert torch.equal(finder.model.q.weight, sparse_q) is default  # the sparse run loads the sparse model
    assert not choose_sparse(tmp_path / "no-run")[0]


def test_a_malformed_held_out_record_names_the_file(tmp_path):
    (tmp_path / "sparse.json").write_text(json.dumps({"threshold": 0.75, "held_out": {"default": "yes"}}))
    with pytest.raises(CheckpointError, match=r"sparse\.json: 'held_out' needs 'default' \(true or false\)"):
        choose_sparse(tmp_path)
