"""Property-based tests (hypothesis) over the public entry points.

Entry points: ``create_backbone(...).forward_features`` and ``.get_intermediate_layers``, ``EoMT.forward``, the peak
finder (``PeakFinder.find`` with a tiny EoMT, ``peakfind.find_peaks``) and the frame readers (``open_frames`` on
.npy / HDF5 / zarr files written by the test). Inputs are drawn at random: sizes from 1 pixel up (divisible by the
patch size or not), channels, batch sizes including 0, dtypes (float16/32/64, bfloat16, integers, bool), NaN/inf.

The contract checked for every draw: the call either returns a correct result (shapes from the documented rules,
dtypes, finite outputs for finite inputs, peaks inside the frame, values equal to the file's...) or raises a
documented vitkit error (``vitkit.errors.VitkitError`` and subclasses); no other exception type may escape, and
where the documentation says which error an input gets (``InputError`` for a non-float batch, a wrong channel
count, a size the patch size does not divide without ``dynamic_pad``...), the test predicts it.

Inputs that once hit a known defect (empty batches, 0-pixel images and panels, bad ``n``, zero events, NaN pixels
in the peak finder, zarr chunks left to the fill value) are drawn like any other; the tests at the end pin the
fixed behaviour (issue 15). A new known defect may be pinned there by a strict ``xfail``, its inputs left out of
the domain until it is fixed.

Budget: tiny models built once per module (embed_dim 32, depth <= 2, patch 8, images <= 48 px), 200 examples per
entry point, ``derandomize=True`` (the same examples on every run, so CI is reproducible) and no example database.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import vitkit  # noqa: E402
from vitkit.errors import InputError, VitkitError  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import randomize  # noqa: E402

PROPS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
P = 8  # patch size of every tiny model
TORCH_DTYPES = [torch.float32] * 4 + [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8,
                                      torch.bool]
SPECIALS = [None] * 5 + [float("nan"), float("inf"), float("-inf")]


# ------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def backbones():
    """Tiny backbones of different token layouts, all patch 8, weights perturbed (LayerScale ~0.1, not 1e-5)."""
    torch.manual_seed(0)
    tiny = dict(embed_dim=32, depth=2, num_heads=4, patch_size=P)
    models = {
        # learned pos-embed + 4 registers, 1 channel; img_size 20 is not a multiple of 8 -> dynamic_pad on
        "dinov2_mono_pad": vitkit.create_backbone("dinov2_vits14_reg", img_size=20, in_chans=1, **tiny),
        "dinov3_rope": vitkit.create_backbone("dinov3_vits16", img_size=32, **tiny),  # RoPE, no padding
        "ijepa_no_cls": vitkit.create_backbone("ijepa_vith14", img_size=32, **tiny),  # no CLS token, sin-cos
        "deit_dist": vitkit.create_backbone("deit_tiny_patch16", img_size=32, **tiny),  # distillation token
    }
    models = {k: randomize(m, seed=i).eval() for i, (k, m) in enumerate(models.items())}
    models["dinov2_bf16"] = randomize(vitkit.create_backbone("dinov2_vits14", img_size=24, **tiny), 9).eval().to(
        torch.bfloat16)  # a model cast for low-precision inference: takes any float input, answers in bf16
    return models


@pytest.fixture(scope="module")
def eomts():
    torch.manual_seed(0)
    tiny = dict(embed_dim=32, depth=2, num_heads=4, patch_size=P, num_q=4, num_blocks=1)
    models = {
        # dynamic_pad (img 20), masks at 1/4 of the input (ceil)
        "dinov2_mono_stride4": vitkit.EoMT("dinov2_vits14_reg", img_size=(20, 28), in_chans=1, num_classes=2,
                                           mask_stride=4, **tiny),
        # no padding, the official upscaler rule (patch 8 -> one x2 block: masks at the grid x 2), normalisation
        "dinov3_rgb_norm": vitkit.EoMT("dinov3_vits16", img_size=(32, 32), num_classes=3,
                                       pixel_mean=[0.485, 0.456, 0.406], pixel_std=[0.229, 0.224, 0.225], **tiny),
    }
    return {k: randomize(m, seed=i).eval() for i, (k, m) in enumerate(models.items())}


@pytest.fixture(scope="module")
def peak_model():
    """A tiny 2-class (background, peak) EoMT on 16 px mono windows; masks at the patch grid (no upscaler convs),
    which the finder resizes to the window."""
    torch.manual_seed(0)
    m = vitkit.EoMT("dinov2_vits14_reg", embed_dim=32, depth=1, num_heads=4, patch_size=P, img_size=(16, 16),
                    in_chans=1, num_classes=2, num_q=4, num_blocks=1, mask_stride=P)
    return randomize(m, seed=0, scale=0.5).eval()


# ------------------------------------------------------------------------------------------- strategies
sides = st.one_of(st.just(1), st.integers(1, 48), st.integers(1, 6).map(lambda k: k * P))


@st.composite
def image_batches(draw, max_batch: int = 3):
    """``(x, info)``: a tensor of mostly 4-D shape [B, C, H, W] (sometimes 2-, 3- or 5-D), any dtype, and at most one
    NaN/inf pixel in sample 0."""
    ndim = draw(st.sampled_from([4] * 8 + [2, 3, 5]))
    b, c, h, w = draw(st.integers(0, max_batch)), draw(st.integers(1, 4)), draw(sides), draw(sides)
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    scale = draw(st.sampled_from([1.0, 1.0, 1e-3, 1e3]))
    special = draw(st.sampled_from(SPECIALS))
    seed = draw(st.integers(0, 2 ** 16))
    shape = {4: (b, c, h, w), 2: (h, w), 3: (c, h, w), 5: (b, 1, c, h, w)}[ndim]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if dtype.is_floating_point:
        x = x.to(dtype)
        if special is not None and x.numel():
            x.view(-1)[int(torch.randint(0, x[0].numel() if ndim in (4, 5) else x.numel(), (1,), generator=g))] \
                = special
    else:
        special = None
        x = (x * 10).round().clamp(0, 255).to(dtype) if dtype != torch.int64 else (x * 10).round().to(dtype)
    return x, {"special": special}


def _expected_input_error(model, x: torch.Tensor) -> str | None:
    """The documented ``InputError`` for ``x`` (``VisionTransformer.check_input``), or None when x is valid."""
    c = model.config
    if x.ndim != 4:
        return "4-D image batch"
    if not x.is_floating_point():
        return "floating-point image batch"
    if 0 in x.shape[2:]:
        return "has no pixels"
    if x.shape[1] != c.in_chans:
        return f"in_chans={c.in_chans}"
    if (x.shape[2] % c.patch_size or x.shape[3] % c.patch_size) and not c.dynamic_pad:
        return "not divisible by the patch size"
    return None


def _grid(model, x: torch.Tensor) -> tuple[int, int]:
    """Token grid: H/p x W/p, rounded up with dynamic_pad (inputs are zero-padded bottom/right)."""
    return math.ceil(x.shape[2] / P), math.ceil(x.shape[3] / P)


def _finite(*ts) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in ts if t is not None)


def _other_samples_finite(ts, x, special) -> None:
    """A NaN/inf pixel in sample 0 stays in sample 0."""
    if special is not None and x.shape[0] > 1:
        assert _finite(*[t[1:] for t in ts])


# ------------------------------------------------------------------------------ backbone.forward_features
@PROPS
@given(name=st.sampled_from(["dinov2_mono_pad", "dinov3_rope", "ijepa_no_cls", "deit_dist", "dinov2_bf16"]),
       batch=image_batches())
@example(name="dinov2_mono_pad", batch=(torch.randn(1, 1, 1, 1), {"special": None}))  # 1 pixel -> one padded token
@example(name="dinov3_rope", batch=(torch.randn(2, 3, 9, 17), {"special": None}))  # not divisible, no dynamic_pad
def test_forward_features(backbones, name, batch):
    bb, (x, info) = backbones[name], batch
    want_error = _expected_input_error(bb, x)
    try:
        with torch.no_grad():
            out = bb.forward_features(x)
    except VitkitError as e:
        assert isinstance(e, InputError) and want_error is not None and want_error in str(e), (want_error, e)
        return
    assert want_error is None, f"expected an InputError ({want_error}) for {tuple(x.shape)} {x.dtype}"
    B, D, R = x.shape[0], bb.embed_dim, bb.num_register_tokens
    gh, gw = _grid(bb, x)
    dtype = next(bb.parameters()).dtype  # inputs are cast to the weights' dtype
    assert out["x_norm_patchtokens"].shape == (B, gh * gw, D) and out["x_norm_patchtokens"].dtype == dtype
    assert out["x_norm_regtokens"].shape == (B, R, D)
    assert out["x_prenorm"].shape == (B, bb.num_prefix_tokens + gh * gw, D)
    if bb.cls_token is None:
        assert out["x_norm_clstoken"] is None
    else:
        assert out["x_norm_clstoken"].shape == (B, D)
    if bb.dist_token is not None:
        assert out["x_norm_disttoken"].shape == (B, D)
    tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
    if info["special"] is None:
        assert _finite(*tensors)
    _other_samples_finite(tensors, x, info["special"])


# ----------------------------------------------------------------------- backbone.get_intermediate_layers
layer_selections = st.one_of(st.integers(-1, 4), st.lists(st.integers(-3, 3), min_size=0, max_size=3))


@PROPS
@given(name=st.sampled_from(["dinov2_mono_pad", "dinov3_rope", "ijepa_no_cls", "deit_dist", "dinov2_bf16"]),
       batch=image_batches(), n=layer_selections, reshape=st.booleans(), cls=st.booleans(), norm=st.booleans(),
       extra=st.booleans())
@example(name="dinov2_mono_pad", batch=(torch.randn(2, 1, 1, 1), {"special": None}), n=2, reshape=True, cls=True,
         norm=True, extra=True)
@example(name="ijepa_no_cls", batch=(torch.randn(1, 3, 16, 16), {"special": None}), n=1, reshape=False, cls=True,
         norm=True, extra=False)
def test_get_intermediate_layers(backbones, name, batch, n, reshape, cls, norm, extra):
    bb, (x, info) = backbones[name], batch
    depth = len(bb.blocks)
    if isinstance(n, int):
        bad_n, indices = not 1 <= n <= depth, list(range(depth - n, depth))
    else:
        bad_n, indices = not n or any(not -depth <= i < depth for i in n), sorted({i % depth for i in n})
    try:
        with torch.no_grad():
            out = bb.get_intermediate_layers(x, n=n, reshape=reshape, return_class_token=cls, norm=norm,
                                             return_extra_tokens=extra)
    except VitkitError as e:
        assert isinstance(e, InputError)
        if bad_n:  # documented: n is checked first
            assert str(e).startswith(("n=", "block indices")), e
            return
        assert ("no CLS token" in str(e)) if (cls and bb.cls_token is None) else \
            (_expected_input_error(bb, x) or "?") in str(e)
        return
    assert not bad_n and not (cls and bb.cls_token is None) and _expected_input_error(bb, x) is None
    B, D, R = x.shape[0], bb.embed_dim, bb.num_register_tokens
    gh, gw = _grid(bb, x)
    assert len(out) == len(indices)
    for entry in out:
        parts = entry if (cls or extra) else (entry,)
        assert isinstance(parts, tuple) and len(parts) == 1 + cls + extra
        patch = parts[0]
        assert patch.shape == ((B, D, gh, gw) if reshape else (B, gh * gw, D))
        if cls:
            assert parts[1].shape == (B, D)
        if extra:
            assert parts[-1].shape == (B, R, D)
        if info["special"] is None:
            assert _finite(*parts)
        _other_samples_finite(parts, x, info["special"])
    if norm and indices[-1] == depth - 1 and info["special"] is None and B:  # the last block's = forward_features
        last = out[-1][0] if (cls or extra) else out[-1]
        with torch.no_grad():
            ref = bb.forward_features(x)["x_norm_patchtokens"]
        last = last.flatten(2).transpose(1, 2) if reshape else last
        torch.testing.assert_close(last, ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- EoMT.forward
@PROPS
@given(name=st.sampled_from(["dinov2_mono_stride4", "dinov3_rgb_norm"]), batch=image_batches(max_batch=2),
       train=st.booleans())
@example(name="dinov2_mono_stride4", batch=(torch.randn(1, 1, 1, 1), {"special": None}), train=False)
@example(name="dinov2_mono_stride4", batch=(torch.randn(2, 1, 9, 17), {"special": float("nan")}), train=True)
def test_eomt_forward(eomts, name, batch, train):
    model, (x, info) = eomts[name], batch
    want_error = _expected_input_error(model.encoder, x)
    model.train(train)
    try:
        with torch.no_grad():
            masks, classes = model(x)
    except VitkitError as e:
        assert isinstance(e, InputError) and want_error is not None and want_error in str(e), (want_error, e)
        return
    finally:
        model.eval()
    assert want_error is None
    B, H, W = x.shape[0], x.shape[2], x.shape[3]
    # documented mask size: ceil(H / mask_stride); with mask_stride=None the patch grid x 2^(upscale blocks)
    if model.mask_stride is not None:
        hw = (math.ceil(H / model.mask_stride), math.ceil(W / model.mask_stride))
    else:
        hw = (math.ceil(H / P) * 2 ** len(model.upscale), math.ceil(W / P) * 2 ** len(model.upscale))
    assert model.mask_size(H, W) == hw
    assert len(masks) == len(classes) == model.num_blocks + 1  # masks annealed on: every masked block + final
    assert all(m.shape == (B, model.num_q, *hw) and m.dtype == torch.float32 for m in masks)
    assert all(c.shape == (B, model.num_q, model.num_classes + 1) for c in classes)
    if info["special"] is None:
        assert _finite(*masks, *classes)
    _other_samples_finite(masks + classes, x, info["special"])


# -------------------------------------------------------------------------------------------- peak finding
NP_DTYPES = [np.float32] * 3 + [np.float64, np.float16, np.uint16, np.int32, bool]


def _frames(rng: np.random.Generator, shape, dtype, spots: int) -> np.ndarray:
    """Detector-like frames: a pedestal with noise and a few 3x3 bright spots, in ``dtype``."""
    a = rng.normal(100.0, 5.0, size=shape)
    if a.size and spots and a.ndim >= 2:
        h, w = shape[-2:]
        flat = a.reshape(-1, h, w)
        for f in flat:
            for _ in range(spots):
                y, x = rng.integers(0, h), rng.integers(0, w)
                f[max(0, y - 1):y + 2, max(0, x - 1):x + 2] += rng.uniform(50, 2000)
    if dtype is bool:
        return a > 150
    return a.astype(dtype)


@st.composite
def events(draw):
    ndim = draw(st.sampled_from([2, 3, 3, 4, 4, 1, 5]))
    n, p = draw(st.integers(0, 2)), draw(st.integers(1, 2))
    h, w = draw(st.one_of(st.just(0), st.integers(1, 20))), draw(st.one_of(st.just(0), st.integers(1, 20)))
    shape = {1: (w,), 2: (h, w), 3: (n, h, w), 4: (n, p, h, w), 5: (1, n, p, h, w)}[ndim]
    dtype = draw(st.sampled_from(NP_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    ev = _frames(rng, shape, dtype, draw(st.integers(0, 3)))
    special = draw(st.sampled_from(SPECIALS)) if np.issubdtype(ev.dtype, np.floating) and ev.size else None
    if special is not None:
        ev.reshape(-1)[rng.integers(0, ev.size)] = special
    good_kind = draw(st.sampled_from([None, None, "match", "wrong"]))
    good = None
    if good_kind is not None and ndim in (2, 3, 4):
        stack = {2: (1, h, w), 3: (1, h, w), 4: (p, h, w)}[ndim]
        if good_kind == "wrong":
            stack = (stack[0], stack[1] + 1, stack[2])
        good = rng.random(stack) > 0.2
    return ev, good, special


@pytest.fixture(scope="module")
def finders(peak_model):
    from vitkit.apps.peaks.finder import PeakFinder

    return {thr: PeakFinder(peak_model, threshold=thr, hysteresis=hyst, min_pixels=mp)
            for thr, hyst, mp in ((0.6, 0.25, 3), (0.9, None, 1), (0.97, 0.9, 2), (0.995, None, 1))}


@PROPS
@given(data=events(), thr=st.sampled_from([0.6, 0.9, 0.97, 0.995]))
@example(data=(np.ones((1, 1), np.float32), None, None), thr=0.6)  # one pixel
@example(data=(np.full((3, 5), 7, np.uint16), np.ones((1, 3, 5), bool), None), thr=0.9)
def test_peak_finder(finders, data, thr):
    from vitkit.apps.peaks.peakfind import PEAK_DTYPE

    finder, (ev, good, _special) = finders[thr], data  # NaN/inf pixels: checked below for every draw
    try:
        masks, tables = finder.find(ev, good=good)
    except VitkitError as e:
        assert isinstance(e, InputError)
        assert ev.ndim in (1, 5) or 0 in ev.shape[-2:] or (good is not None and "mask has shape" in str(e)), e
        return
    assert ev.ndim in (2, 3, 4) and 0 not in ev.shape[-2:]
    assert not (good is not None and good.shape[-2:] != ev.shape[-2:])
    shape4 = {2: (1, 1, *ev.shape), 3: (ev.shape[0], 1, *ev.shape[1:]), 4: ev.shape}[ev.ndim]
    N, Pn, H, W = shape4
    assert masks.shape == shape4 and masks.dtype == bool and len(tables) == N
    if good is not None:
        assert not (masks & ~good[None]).any()  # a bad pixel is never part of a peak
    raw = ev.reshape(shape4).astype(np.float64)
    assert not (masks & ~np.isfinite(raw)).any()  # documented: a NaN/inf pixel is a bad pixel of its event
    for i, t in enumerate(tables):
        assert t.dtype == PEAK_DTYPE and len(t) <= finder.max_peaks
        assert ((t["panel"] >= 0) & (t["panel"] < Pn)).all()
        assert ((t["ss"] >= 0) & (t["ss"] <= H - 1) & (t["fs"] >= 0) & (t["fs"] <= W - 1)).all()  # inside
        assert (t["slab_fs"] == t["fs"]).all() and (t["slab_ss"] == t["ss"]).all()  # no detector: slab = panel
        assert np.isnan(t["x_lab"]).all() and np.isnan(t["y_lab"]).all()
        assert (t["npix"] >= finder.min_pixels).all() and t["npix"].sum() <= masks[i].sum()
        # NaN/inf pixels are bad pixels: never in a peak, so the sums stay finite
        assert np.isfinite(t["intensity"]).all() and np.isfinite(t["max_value"]).all()
        for k in range(Pn):  # peaks of a panel integrate at most its peak pixels
            sel = t["panel"] == k
            fin = np.isfinite(raw[i, k])
            assert t["intensity"][sel].sum() <= raw[i, k][masks[i, k]].clip(0).sum() + 1e-6 * (1 + abs(
                raw[i, k][fin]).sum())
        if good is not None and len(t):  # documented: a peak whose centroid is on a bad pixel is dropped
            g = np.broadcast_to(good, (Pn, H, W))
            assert g[t["panel"], np.rint(t["ss"]).astype(int), np.rint(t["fs"]).astype(int)].all()


# ----------------------------------------------------------------------------------------------- find_peaks
@PROPS
@given(h=st.integers(0, 20), w=st.integers(0, 20), fill=st.floats(0.0, 0.6), mask_dtype=st.sampled_from(
    [bool, np.uint8, np.int32, np.float32]), img_dtype=st.sampled_from([np.float32, np.float64, np.uint16, np.int32]),
       min_pixels=st.integers(1, 4), connectivity=st.sampled_from([8, 8, 4, 6]),
       method=st.sampled_from(["auto", "ndimage", "sparse", "bogus"]), special=st.sampled_from(SPECIALS),
       shape_error=st.sampled_from([None] * 8 + ["ndim", "mismatch"]), seed=st.integers(0, 2 ** 16))
def test_find_peaks(h, w, fill, mask_dtype, img_dtype, min_pixels, connectivity, method, special, shape_error, seed):
    from scipy import ndimage

    from vitkit.apps.peaks.peakfind import find_peaks

    rng = np.random.default_rng(seed)
    mask = (rng.random((h, w)) < fill).astype(mask_dtype)
    image = rng.normal(10.0, 3.0, size=(h, w)).astype(img_dtype)
    if special is not None and img_dtype in (np.float32, np.float64) and image.size:
        image.reshape(-1)[rng.integers(0, image.size)] = special
    else:
        special = None
    if shape_error == "ndim":
        mask = mask[None]
    elif shape_error == "mismatch":
        image = np.zeros((h + 1, w), img_dtype)
    try:
        peaks = find_peaks(mask, image, min_pixels=min_pixels, connectivity=connectivity, method=method)
    except VitkitError as e:
        assert isinstance(e, InputError)
        assert shape_error or connectivity == 6 or method == "bogus", e
        return
    assert shape_error is None and connectivity in (4, 8)
    assert peaks.dtype == np.float64 and peaks.ndim == 2 and peaks.shape[1] == 3
    structure = np.ones((3, 3)) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    lab, n = ndimage.label(mask != 0, structure=structure)
    sizes = np.bincount(lab.ravel())[1:]
    assert len(peaks) == int((sizes >= min_pixels).sum())  # one row per component big enough
    if len(peaks) and special is None:
        assert np.isfinite(peaks).all()
        assert ((peaks[:, 0] >= 0) & (peaks[:, 0] <= h - 1) & (peaks[:, 1] >= 0) & (peaks[:, 1] <= w - 1)).all()
        kept = [k + 1 for k in range(n) if sizes[k] >= min_pixels]
        # integrated intensity = the component's sum; the centroid lies in its bounding box
        sums = ndimage.sum_labels(image.astype(np.float64), lab, kept)
        np.testing.assert_allclose(peaks[:, 2], sums, rtol=1e-9, atol=1e-9)
        for row, k in zip(peaks, kept):
            ys, xs = np.nonzero(lab == k)
            assert ys.min() - 1e-9 <= row[0] <= ys.max() + 1e-9 and xs.min() - 1e-9 <= row[1] <= xs.max() + 1e-9
    if method != "bogus" and mask.ndim == 2:  # the labelling back-ends agree
        other = find_peaks(mask, image, min_pixels, connectivity, "ndimage" if method == "sparse" else "sparse")
        np.testing.assert_array_equal(peaks, other)


# ------------------------------------------------------------------------------------------- frame readers
_counter = itertools.count()


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("frames")


def _write(fmt: str, directory, a: np.ndarray) -> str:
    import h5py
    import zarr

    path = os.path.join(directory, f"f{next(_counter)}.{fmt}")
    if fmt == "npy":
        np.save(path, a)
    elif fmt == "h5":
        with h5py.File(path, "w") as f:
            f["data"] = a
    else:
        g = zarr.open_group(path, mode="w", zarr_format=2)
        chunks = (1, *a.shape[1:]) if a.ndim >= 3 else a.shape
        # zarr's default writer: chunks equal to the fill value (all-zero/False frames) are not stored
        g.create_array("images", shape=a.shape, dtype=a.dtype, chunks=tuple(max(1, c) for c in chunks))[...] = a
    return path


@PROPS
@given(fmt=st.sampled_from(["npy", "h5", "zarr"]), ndim=st.sampled_from([3, 3, 3, 2, 4, 1, 5]),
       n=st.integers(0, 3), h=st.integers(1, 12), w=st.integers(1, 12),
       dtype=st.sampled_from([np.float32, np.float64, np.float16, np.uint8, np.uint16, np.int32, np.int64, bool]),
       special=st.sampled_from(SPECIALS), check_finite=st.booleans(), seed=st.integers(0, 2 ** 16))
@example(fmt="zarr", ndim=3, n=1, h=1, w=1, dtype=np.float32, special=None, check_finite=True, seed=0)
def test_open_frames(frames_dir, fmt, ndim, n, h, w, dtype, special, check_finite, seed):
    from vitkit.apps.peaks.io import NaNFrameError, UnsupportedFormatError, open_frames

    directory = frames_dir
    rng = np.random.default_rng(seed)
    shape = {1: (w,), 2: (h, w), 3: (n, h, w), 4: (n, 2, h, w), 5: (1, n, 2, h, w)}[ndim]
    a = rng.normal(0, 100, size=shape)
    a = (a > 0) if dtype is bool else (a if np.issubdtype(dtype, np.floating) else np.abs(a).clip(0, 250)).astype(dtype)
    bad_frame = None
    if special is not None and np.issubdtype(a.dtype, np.floating) and a.size and ndim in (2, 3, 4):
        idx = np.unravel_index(rng.integers(0, a.size), a.shape)
        a[idx] = special
        bad_frame = 0 if ndim == 2 else int(idx[0])
    path = _write(fmt, directory, a)
    try:
        src = open_frames(path, check_finite=check_finite)
    except VitkitError as e:
        assert isinstance(e, UnsupportedFormatError) and ndim in (1, 5), e
        return
    with src:
        assert ndim in (2, 3, 4)
        frames = a[None] if ndim == 2 else a
        assert len(src) == len(frames) and src.frame_shape == frames.shape[1:]
        for i in range(len(src)):
            try:
                frame = src[i]
            except NaNFrameError as e:
                assert check_finite and i == bad_frame and e.frame == i
                continue
            assert frame.dtype == np.float32 and frame.shape == frames.shape[1:]
            np.testing.assert_array_equal(frame, frames[i].astype(np.float32))  # NaN positions equal too
            assert i != bad_frame or not check_finite
        if bad_frame is None or not check_finite:
            assert src[:].shape == frames.shape


# ------------------------------------------------------------------ formerly known defects (issue 15), now fixed
# Each was a strict xfail; the fixed behaviour is now asserted, and the properties above draw these inputs.

def test_kernels_empty_batch(backbones):
    """Formerly a known defect: vitkit.kernels' first-call comparison failed on an empty batch."""
    with torch.no_grad():  # inference: where vitkit.kernels may pick another kernel
        out = backbones["dinov3_rope"].forward_features(torch.randn(0, 3, 16, 16))
    assert out["x_norm_patchtokens"].shape == (0, 4, 32)


def test_intermediate_layers_empty_batch(backbones):
    """Formerly a known defect: reshape=True reshaped with -1, ambiguous for an empty batch."""
    # with autograd on (trainable weights), vitkit.kernels keeps stock PyTorch: this is get_intermediate_layers' own
    out = backbones["dinov3_rope"].get_intermediate_layers(torch.randn(0, 3, 16, 16), n=1, reshape=True)
    assert out[0].shape == (0, 32, 2, 2)


@pytest.mark.parametrize("shape", [(1, 1, 0, 5), (2, 1, 5, 0), (0, 1, 0, 0)])
def test_zero_size_image_is_an_input_error(backbones, shape):
    with pytest.raises(InputError, match="has no pixels"):
        backbones["dinov2_mono_pad"].forward_features(torch.randn(shape))


def test_one_pixel_image_error_suggests_no_empty_crop(backbones):
    with pytest.raises(InputError, match="not divisible") as e:
        backbones["dinov3_rope"].forward_features(torch.randn(1, 3, 1, 1))
    assert "crop" not in str(e.value) and "pad to 8x8" in str(e.value)


@pytest.mark.parametrize("n", [0, 3, [5], [-3], []])
def test_intermediate_layers_bad_n_is_an_input_error(backbones, n):
    with pytest.raises(InputError, match="n=|block indices"):
        backbones["dinov3_rope"].get_intermediate_layers(torch.randn(1, 3, 16, 16), n=n)


@pytest.mark.parametrize("train", [False, True])
def test_eomt_empty_batch(eomts, train):
    """Formerly a known defect: EoMT.predict reshaped with -1 (ambiguous for B=0), and the kernel candidates
    could not stack an empty batch."""
    model = eomts["dinov3_rgb_norm"].train(train)
    try:
        with torch.no_grad():
            masks, classes = model(torch.randn(0, 3, 32, 32))
    finally:
        model.eval()
    assert masks[-1].shape == (0, 4, 8, 8) and classes[-1].shape == (0, 4, 4)


def test_peak_finder_no_events(finders):
    """Formerly a known defect (np.stack of zero events): no events give empty masks and no tables."""
    masks, tables = finders[0.6].find(np.zeros((0, 8, 8), np.float32))
    assert masks.shape == (0, 1, 8, 8) and masks.dtype == bool and tables == []
    masks, tables = finders[0.9].find(np.zeros((0, 2, 8, 8), np.float32), good=np.ones((2, 8, 8), bool))
    assert masks.shape == (0, 2, 8, 8) and tables == []


@pytest.mark.parametrize("shape", [(1, 0, 5), (0, 5), (2, 1, 4, 0), (0, 0, 0)])
def test_peak_finder_zero_size_panel_is_an_input_error(finders, shape):
    with pytest.raises(InputError, match="without pixels"):
        finders[0.6].find(np.zeros(shape, np.float32))


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_peak_finder_nan_pixel_is_a_bad_pixel(peak_model, special):
    """Formerly a known defect (one NaN pixel emptied the panel): a non-finite pixel is a bad pixel of its event."""
    from vitkit.apps.peaks.finder import PeakFinder

    finder = PeakFinder(peak_model, threshold=0.0, hysteresis=None, min_pixels=1, lone_pixel_ratio=None)
    frame = np.random.default_rng(0).normal(100, 5, size=(16, 16)).astype(np.float32)
    masks, tables = finder.find(frame)
    assert len(tables[0]) >= 1  # a finite frame: every pixel is a peak pixel at threshold 0
    frame[3, 3] = special
    nan_masks, nan_tables = finder.find(frame)
    assert len(nan_tables[0]) >= 1 and not nan_masks[0, 0, 3, 3]
    assert np.isfinite(nan_tables[0]["intensity"]).all() and np.isfinite(nan_tables[0]["ss"]).all()


def test_peak_finder_one_class_model_is_a_config_error(peak_model):
    from vitkit.apps.peaks.finder import PeakFinder
    from vitkit.errors import ConfigError

    model = vitkit.EoMT("dinov2_vits14_reg", embed_dim=32, depth=1, num_heads=4, patch_size=P, img_size=(16, 16),
                        in_chans=1, num_classes=1, num_q=4, num_blocks=1, mask_stride=1)
    with pytest.raises(ConfigError, match="num_classes=1"):
        PeakFinder(model)
    with pytest.raises(ConfigError, match="num_classes=1"):
        PeakFinder(peak_model).with_model(model)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_fill_value_chunks_are_not_truncation(tmp_path, zarr_format):
    """Formerly a known defect: chunks zarr skipped as equal to the fill value were counted as missing."""
    import zarr

    from vitkit.apps.peaks.io import CorruptFileError, open_frames

    g = zarr.open_group(str(tmp_path / "dark.zarr"), mode="w", zarr_format=zarr_format)
    a = np.zeros((3, 4, 4), np.float32)
    a[1] = 5
    g.create_array("images", shape=a.shape, dtype="float32", chunks=(1, 4, 4))[...] = a
    with open_frames(str(tmp_path / "dark.zarr")) as src:
        np.testing.assert_array_equal(src[:], a)
    if zarr_format == 2:  # no fill value: a missing chunk has no defined content, so it is a truncation
        g = zarr.open_group(str(tmp_path / "nofill.zarr"), mode="w", zarr_format=2)
        g.create_array("images", shape=a.shape, dtype="float32", chunks=(1, 4, 4), fill_value=None)[...] = a
        os.remove(tmp_path / "nofill.zarr" / "images" / "1.0.0")
        with pytest.raises(CorruptFileError, match="truncated"):
            open_frames(str(tmp_path / "nofill.zarr"))


def test_complex_frames_are_an_input_error(tmp_path):
    """Formerly a known defect: complex frames were cast to float32, silently dropping the imaginary part."""
    from vitkit.apps.peaks.io import open_frames

    np.save(tmp_path / "c.npy", np.full((1, 2, 2), 1 + 1j, np.complex64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match=r"c\.npy.*complex64"):
            open_frames(str(tmp_path / "c.npy"))[0]
