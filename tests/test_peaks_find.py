"""Mask -> peaks: the vectorised find_peaks against a per-component reference loop, filters, logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from vitkit.apps.peaks import find_peaks, label_components, logits_to_mask, peaks_per_frame
from vitkit.errors import InputError


def reference_peaks(mask: np.ndarray, image: np.ndarray, connectivity: int = 8, min_pixels: int = 1) -> np.ndarray:
    """Slow, obvious reference: ndimage.label, then one component at a time with center_of_mass / sum."""
    structure = np.ones((3, 3)) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    lab, n = ndimage.label(mask, structure=structure)
    weights = np.clip(image.astype(np.float64), 0, None)
    out = []
    for i in range(1, n + 1):
        comp = lab == i
        if comp.sum() < min_pixels:
            continue
        if weights[comp].sum() > 0:
            cy, cx = ndimage.center_of_mass(weights, lab, i)
        else:
            cy, cx = ndimage.center_of_mass(comp)
        out.append((cy, cx, float(image[comp].astype(np.float64).sum())))
    return np.array(out, dtype=np.float64).reshape(-1, 3)


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("method", ["sparse", "ndimage", "auto"])
@pytest.mark.parametrize("fill", [0.02, 0.3, 0.7])
def test_matches_reference_on_random_masks(method, connectivity, fill):
    rng = np.random.default_rng(int(fill * 100) + connectivity)
    for shape in [(37, 53), (64, 48)]:
        mask = rng.random(shape) < fill
        image = rng.normal(1.0, 2.0, size=shape).astype(np.float32)  # negative values: clipped weights
        image[rng.random(shape) < 0.2] = -1.0  # some components have zero total weight -> unweighted mean
        ref = reference_peaks(mask, image, connectivity)
        got = find_peaks(mask, image, connectivity=connectivity, method=method)
        assert got.shape == ref.shape and len(ref) > 0
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
        got3 = find_peaks(mask, image, connectivity=connectivity, method=method, min_pixels=3)
        np.testing.assert_allclose(got3, reference_peaks(mask, image, connectivity, min_pixels=3), atol=1e-9)


def test_sparse_and_ndimage_labels_agree_on_edge_touching_components():
    # components that touch every border and wrap-around neighbours (x = W-1 next to x = 0 of the next row)
    mask = np.zeros((6, 7), dtype=bool)
    mask[:, 0] = True
    mask[2, 6] = True  # must not join column 0 of row 3
    mask[5, 3:] = True
    mask[0, 6] = True
    a = label_components(mask, 8, "sparse")
    b = label_components(mask, 8, "ndimage")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[2] == 4


def test_hand_made_components():
    mask = np.zeros((5, 6), dtype=bool)
    image = np.zeros((5, 6), dtype=np.float32)
    mask[1, 1:3] = True
    image[1, 1:3] = [1.0, 3.0]  # weighted centroid x = (1*1 + 3*2) / 4 = 1.75
    mask[3, 4] = mask[4, 5] = True  # diagonal: one component with 8-connectivity, two with 4
    image[3, 4], image[4, 5] = -2.0, -1.0  # zero weight -> unweighted mean (3.5, 4.5); sum -3
    got = find_peaks(mask, image)
    np.testing.assert_allclose(got, [[1.0, 1.75, 4.0], [3.5, 4.5, -3.0]])
    got4 = find_peaks(mask, image, connectivity=4)
    np.testing.assert_allclose(got4, [[1.0, 1.75, 4.0], [3.0, 4.0, -2.0], [4.0, 5.0, -1.0]])
    np.testing.assert_allclose(find_peaks(mask, image, min_pixels=2), got)
    np.testing.assert_allclose(find_peaks(mask, image, connectivity=4, min_pixels=2), got4[:1])
    # integer masks and images, torch tensors
    np.testing.assert_allclose(find_peaks(torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(image)), got)
    assert find_peaks(np.zeros((4, 4), bool), np.ones((4, 4))).shape == (0, 3)


def test_order_is_raster_order_of_first_pixel():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 6] = True  # first in raster order
    mask[1:7, 1] = True  # starts at row 1 ...
    mask[6, 1:5] = True
    mask[2, 4] = True  # ... but this one starts at row 2
    image = np.ones((8, 8))
    ys = find_peaks(mask, image, method="sparse")[:, 0]
    np.testing.assert_allclose(ys, find_peaks(mask, image, method="ndimage")[:, 0])
    np.testing.assert_allclose(find_peaks(mask, image)[:, 2], [1, 9, 1])


def test_peaks_per_frame_filters():
    mask = np.zeros((3, 20, 20), dtype=bool)
    image = np.zeros((3, 20, 20), dtype=np.float32)
    for k, (y, x) in enumerate([(2, 2), (2, 10), (10, 2), (10, 10), (16, 16)]):
        mask[0, y, x] = True
        image[0, y, x] = [5, 1, 4, 2, 3][k]
    mask[1, 5, 5] = True
    image[1, 5, 5] = 7
    out = peaks_per_frame(mask, image, min_peaks=2, max_peaks=3)
    assert len(out) == 3
    # frame 0: 5 peaks > 3 -> the 3 brightest (5, 4, 3) in raster order
    np.testing.assert_allclose(out[0], [[2, 2, 5], [10, 2, 4], [16, 16, 3]])
    assert out[1].shape == (0, 3)  # 1 peak < min_peaks
    assert out[2].shape == (0, 3)  # empty frame
    assert len(peaks_per_frame(mask, image, max_peaks=None)[0]) == 5
    with pytest.raises(InputError, match="differ in length"):
        peaks_per_frame(mask, image[:2])


def test_logits_to_mask():
    l0 = np.zeros((2, 3), dtype=np.float32)
    l1 = np.array([[-1.0, 0.0, 0.5], [2.0, -3.0, 1.1]], dtype=np.float32)
    logits = np.stack([l0, l1])  # [2, H, W]
    np.testing.assert_array_equal(logits_to_mask(logits), [[False, False, True], [True, False, True]])
    # softmax(peak) = sigmoid(l1): >= 0.75 <=> l1 >= log 3 = 1.0986
    np.testing.assert_array_equal(logits_to_mask(logits, threshold=0.75), [[False, False, False], [True, False, True]])
    batch = torch.from_numpy(np.stack([logits, logits[::-1].copy()]))  # [B, 2, H, W]
    m = logits_to_mask(batch)
    assert m.shape == (2, 2, 3)
    np.testing.assert_array_equal(m[1], [[True, False, False], [False, True, False]])
    np.testing.assert_array_equal(logits_to_mask(l1[None], threshold=0.5), l1 >= 0)
    with pytest.raises(InputError, match="C = 1 or 2"):
        logits_to_mask(np.zeros((3, 4, 4)))


def test_bad_inputs():
    with pytest.raises(InputError, match="differs from the mask shape"):
        find_peaks(np.zeros((4, 4), bool), np.zeros((4, 5)))
    with pytest.raises(InputError, match="2-D mask"):
        find_peaks(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="connectivity"):
        find_peaks(np.ones((4, 4), bool), np.zeros((4, 4)), connectivity=6)
    with pytest.raises(InputError, match="method"):
        find_peaks(np.ones((4, 4), bool), np.zeros((4, 4)), method="gpu")
