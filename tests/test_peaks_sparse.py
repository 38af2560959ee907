"""Sparse-token peak finding: the token scorer's fit (vitkit.apps.peaks.sparse) and PeakFinder(sparse=True).

EoMT's own sparse path (padding, RoPE, dropped pixels) is tested in test_eomt.py; here: the scorer is fitted to
the recall it is asked for, the threshold travels with the saved model, and the finder's sparse path is the dense
one when it keeps every token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit
from vitkit.apps.peaks.finder import PeakFinder, load_model
from vitkit.apps.peaks.lattice import LatticeStillsDataset
from vitkit.apps.peaks.sparse import fit_token_scorer, windows_of
from vitkit.errors import ConfigError


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


def test_windows_are_the_tiling_semantic_inference_runs():
    x = torch.zeros(2, 1, 100, 130)
    boxes = windows_of(x, (64, 64), 0.25)
    ys, xs = sorted({y for _, y, _ in boxes}), sorted({x for _, _, x in boxes})
    assert ys[0] == 0 and ys[-1] == 100 - 64 and xs[0] == 0 and xs[-1] == 130 - 64
    assert len(boxes) == 2 * len(ys) * len(xs) and {b for b, _, _ in boxes} == {0, 1}
    assert all(b - a <= 64 * 0.75 for a, b in zip(ys, ys[1:]))  # at least the asked overlap


def test_fit_reaches_the_asked_recall_prunes_and_travels_with_the_model(shots, tmp_path):
    model = _model()
    finder = PeakFinder(model)
    stats = fit_token_scorer(finder, shots, block=1, recall=0.99, targets="truth", steps=150)
    assert stats["block"] == 1 and model.token_scorer_block == 1
    assert stats["recall"] >= 0.99
    assert 0 < stats["positive_fraction"] < 0.05  # peaks are sparse: positives are a few % of tokens at most
    assert stats["positive_fraction"] < stats["kept_fraction"] < 0.8  # keeps the peaks and prunes the rest
    assert model.token_threshold.item() == pytest.approx(stats["threshold"])
    # the threshold and the scorer are saved with the model and read back by the finder's loader
    model.save_pretrained(tmp_path / "model")
    again = load_model(tmp_path)
    assert again.token_scorer_block == 1 and again.token_threshold.item() == pytest.approx(stats["threshold"])
    torch.testing.assert_close(again.token_scorer[1].weight, model.token_scorer[1].weight)

    # a stricter recall never keeps fewer tokens
    loose = fit_token_scorer(finder, shots, block=1, recall=0.9, targets="truth", steps=150)
    assert loose["kept_fraction"] <= stats["kept_fraction"] and loose["recall"] >= 0.9


def test_model_targets_are_the_dense_finders_peak_pixels(shots, monkeypatch):
    """targets="model" (the default) takes the positive tokens from the dense finder's own peak masks, not from
    labels: a finder whose masks are the labels gives the "truth" fit; one that finds nothing has no positives."""
    model = _model()
    finder = PeakFinder(model)
    truth = fit_token_scorer(finder, shots, block=1, targets="truth", steps=50)
    order = iter(range(len(shots)))
    monkeypatch.setattr(finder, "_masks", lambda ev, g: (np.asarray(shots[next(order)]["label"]) > 0)
                        .reshape(ev.shape))
    as_model = fit_token_scorer(finder, shots, block=1, steps=50)
    assert as_model["positive_fraction"] == truth["positive_fraction"]
    assert as_model["threshold"] == pytest.approx(truth["threshold"])
    monkeypatch.setattr(finder, "_masks", lambda ev, g: np.zeros(ev.shape, dtype=bool))
    with pytest.raises(ConfigError, match="no peak tokens"):
        fit_token_scorer(finder, shots, block=1, steps=2)
    with pytest.raises(ConfigError, match="targets must be"):
        fit_token_scorer(finder, shots, targets="labels")
    with pytest.raises(ConfigError, match="dense PeakFinder"):
        fit_token_scorer(PeakFinder(model, sparse=True), shots)


def test_sparse_finder_keeping_everything_is_the_dense_finder(shots):
    model = _model(seed=1)
    model.add_token_scorer(1)
    item = shots[0]
    ev = np.asarray(item["image"])[:, 0] * 40.0  # two one-panel events
    ev[:, 100:103, 200:203] += 3000.0
    dense = PeakFinder(model, min_pixels=1)
    sparse = PeakFinder(model, min_pixels=1, sparse=True)
    model.token_threshold.fill_(float("-inf"))
    m_dense, t_dense = dense.find(ev)
    m_sparse, t_sparse = sparse.find(ev)
    assert np.array_equal(m_dense, m_sparse)
    for a, b in zip(t_dense, t_sparse):
        assert len(a) == len(b)
        np.testing.assert_allclose(a["fs"], b["fs"], atol=1e-4)
    assert sparse.kept_tokens[0] == sparse.kept_tokens[1] > 0

    # keeping nothing: no window goes past the scorer, so nothing is found
    model.token_threshold.fill_(float("inf"))
    none = PeakFinder(model, sparse=True)
    masks, tables = none.find(ev)
    assert not masks.any() and all(len(t) == 0 for t in tables) and none.kept_tokens[0] == 0


def test_a_model_with_a_scorer_casts_to_bf16_and_scores_alike():
    """`vitkit stream` with model.bf16 and `vitkit predict --bf16` cast a run's model, token scorer included (its
    LayerNorm must take bf16 tokens): the scores and the sparse masks stay close to fp32's."""
    from vitkit.layers.precision import cast_for_inference

    model = _model(seed=2)
    model.add_token_scorer(1)
    with torch.no_grad():
        model.token_scorer[1].weight.normal_()
    x = torch.randn(3, 1, 64, 64)
    with torch.inference_mode():
        tokens, _, _ = model.token_features(x)
        ref = model.token_scores(tokens)
        model.token_threshold.fill_(float(ref.flatten().quantile(0.98)))
        ref_masks = model.forward_sparse(x)[0][-1]
        half = cast_for_inference(model, torch.bfloat16)
        tokens, _, _ = half.token_features(x)
        scores = half.token_scores(tokens)
        masks, _, kept = half.forward_sparse(x)
    assert tokens.dtype == torch.bfloat16 and scores.dtype == torch.float32
    assert (scores - ref).abs().max() < 0.05 * ref.abs().max()
    assert 0 < int(kept.sum()) < kept.numel()
    on, ref_on = masks[-1] > -1e3, ref_masks > -1e3  # the pixels of computed tokens
    both = on & ref_on
    assert 0 < both.sum() >= 0.9 * max(on.sum(), ref_on.sum())
    assert (masks[-1].float() - ref_masks)[both].abs().max() < 0.5


def test_sparse_needs_a_scorer_and_the_fit_needs_peaks(shots):
    with pytest.raises(ConfigError, match="fitted token scorer"):
        PeakFinder(_model(), sparse=True)
    finder = PeakFinder(_model())
    with pytest.raises(ConfigError, match="recall must be"):
        fit_token_scorer(finder, shots, recall=1.5)
    empty = [{**shots[0], "label": np.zeros_like(shots[0]["label"])}]
    with pytest.raises(ConfigError, match="no peak tokens"):
        fit_token_scorer(finder, empty, block=1, targets="truth", steps=2)
    assert finder.model.token_scorer is None and "token_scorer_block" not in finder.model.init_config
    assert "token_threshold" not in finder.model.state_dict()  # saves as a model without a scorer
