"""Turning EoMT outputs into semantic, instance and panoptic predictions; sliding windows for big frames."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitkit.errors import InputError


def semantic_probs(mask_logits: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores [B, C, h, w] = sum_q sigmoid(mask_q) * softmax(class_q) (no-object dropped)."""
    return torch.einsum("bqhw,bqc->bchw", mask_logits.sigmoid(), class_logits.softmax(-1)[..., :-1])


def window_starts(length: int, window: int, min_overlap: float = 0.0) -> list[int]:
    """Evenly spread window starts covering ``length`` with windows of ``window`` (last one flush)."""
    if length <= window:
        return [0]
    step = window * (1 - min_overlap)
    n = math.ceil((length - window) / step) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def windows_of(x: torch.Tensor, window: tuple[int, int], overlap: float) -> list[tuple[int, int, int]]:
    """``(image, top, left)`` of every window :func:`semantic_inference` runs on images ``x`` ``[B, C, H, W]``
    (padded bottom/right to the window when smaller)."""
    B, _, H, W = x.shape
    ys, xs = window_starts(max(H, window[0]), window[0], overlap), window_starts(max(W, window[1]), window[1], overlap)
    return [(b, y, xx) for b in range(B) for y in ys for xx in xs]


@torch.no_grad()
def semantic_inference(model, images: torch.Tensor, window: tuple[int, int] | None = None,
                       overlap: float = 0.25, batch_size: int = 32) -> torch.Tensor:
    """Semantic class scores [B, C, H, W] for frames of any size, at native resolution.

    Frames larger than the window (default: the model's ``img_size``) are tiled into overlapping windows
    whose scores are averaged where they overlap; smaller sides are zero-padded bottom/right and cropped
    back. Nothing is resized, so few-pixel structures keep their size. The windows of all B frames go
    through the model together, ``batch_size`` at a time (16 detector panels are one batch stream).
    """
    if images.ndim != 4:
        raise InputError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    wh, ww = window or tuple(model.img_size)
    ph, pw = max(0, wh - H), max(0, ww - W)
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph))
    Hp, Wp = images.shape[-2:]
    boxes = windows_of(images, (wh, ww), overlap)
    count = images.new_zeros(1, 1, Hp, Wp)
    for _, y, x in boxes[:len(boxes) // B]:  # the first image's windows: every image has the same
        count[..., y:y + wh, x:x + ww] += 1
    out = None
    for s in range(0, len(boxes), batch_size):
        chunk = boxes[s:s + batch_size]
        masks, classes = model(torch.stack([images[b, :, y:y + wh, x:x + ww] for b, y, x in chunk]))
        probs = semantic_probs(masks[-1], classes[-1]).float()
        if probs.shape[-2:] != (wh, ww):
            probs = F.interpolate(probs, size=(wh, ww), mode="bilinear", align_corners=False)
        if out is None:
            out = images.new_zeros(B, probs.shape[1], Hp, Wp, dtype=torch.float32)
        for j, (b, y, x) in enumerate(chunk):
            out[b, :, y:y + wh, x:x + ww] += probs[j]
    out = out / count
    return out[..., :H, :W]


def token_evidence(evidence: torch.Tensor, patch: int) -> torch.Tensor:
    """Per patch token ``[n, gh, gw]``, the largest evidence in its patch and a 1-pixel border. ``evidence``
    ``[n, 1, h + 2, w + 2]`` is a per-pixel map of windows ``h x w`` (e.g.
    :func:`vitkit.apps.peaks.sparse.spot_evidence`) with a 1-pixel margin of their surroundings (``-inf`` where
    there are none)."""
    h, w = evidence.shape[-2] - 2, evidence.shape[-1] - 2
    gh, gw = -(-h // patch), -(-w // patch)
    e = F.pad(evidence, (0, gw * patch - w, 0, gh * patch - h), value=float("-inf"))
    return F.max_pool2d(e, patch + 2, stride=patch)[:, 0]


def token_keep(evidence: torch.Tensor, patch: int, threshold: float) -> torch.Tensor:
    """Patch tokens ``[n, gh, gw]`` to keep for :meth:`vitkit.EoMT.forward_sparse`: those whose
    :func:`token_evidence` exceeds ``threshold``."""
    return token_evidence(evidence, patch) > threshold


@torch.no_grad()
def sparse_semantic_inference(model, images: torch.Tensor, evidence: torch.Tensor, threshold: float,
                              window: tuple[int, int] | None = None, overlap: float = 0.25, batch_size: int = 1024
                              ) -> tuple[torch.Tensor, int, int]:
    """:func:`semantic_inference` through EoMT's sparse-token path (:meth:`vitkit.EoMT.forward_sparse`).

    In every window only the patch tokens :func:`token_keep` keeps (``evidence`` ``[B, 1, H, W]``, a per-pixel map
    of ``images``, above ``threshold``) are computed; each kept token's tile of class scores is added where it
    lies and pixels are averaged over the windows that computed them. Pixels of no kept token score 0 for every
    class. Returns ``(scores [B, C, H, W], kept tokens, all tokens)``.
    """
    if images.ndim != 4 or evidence.shape != (images.shape[0], 1, *images.shape[-2:]):
        raise InputError(f"expected images [B, C, H, W] and evidence [B, 1, H, W], got shapes "
                         f"{tuple(images.shape)} and {tuple(evidence.shape)}")
    B, _, H, W = images.shape
    wh, ww = window or tuple(model.img_size)
    p = model.encoder.patch_size
    if wh % p or ww % p:
        raise InputError(f"sparse inference needs windows of whole patches: window {wh}x{ww}, patch {p}")
    ph, pw = max(0, wh - H), max(0, ww - W)
    images = F.pad(images, (0, pw, 0, ph))
    evidence = F.pad(evidence, (1, 1 + pw, 1, 1 + ph), value=float("-inf"))  # and a 1-pixel margin around
    Hp, Wp = images.shape[-2:]
    boxes = windows_of(images, (wh, ww), overlap)
    out, count = None, images.new_zeros(B * Hp * Wp)
    offsets = (torch.arange(p, device=images.device)[:, None] * Wp + torch.arange(p, device=images.device)).flatten()
    kept = total = 0
    for s in range(0, len(boxes), batch_size):
        chunk = torch.tensor(boxes[s:s + batch_size], device=images.device)
        win = torch.stack([images[b, :, y:y + wh, x:x + ww] for b, y, x in boxes[s:s + batch_size]])
        ev = torch.stack([evidence[b, :, y:y + wh + 2, x:x + ww + 2] for b, y, x in boxes[s:s + batch_size]])
        keep = token_keep(ev, p, threshold)
        kept, total = kept + int(keep.sum()), total + keep.numel()
        tiles, classes, where = model.forward_sparse(win, keep)
        probs = semantic_probs(tiles, classes[where[:, 0]]).float()
        if probs.shape[-1] != p:
            probs = F.interpolate(probs, size=(p, p), mode="bilinear", align_corners=False)
        if out is None:
            out = images.new_zeros(B * Hp * Wp, probs.shape[1], dtype=torch.float32)
        b, y, x = chunk[where[:, 0]].unbind(1)
        idx = (((b * Hp + y + where[:, 1] * p) * Wp + x + where[:, 2] * p)[:, None] + offsets).flatten()
        out.index_add_(0, idx, probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1]))
        count.index_add_(0, idx, count.new_ones(len(idx)))
    out = (out / count.clamp(min=1)[:, None]).view(B, Hp, Wp, -1).permute(0, 3, 1, 2)
    return out[..., :H, :W], kept, total


def instance_predictions(mask_logits: torch.Tensor, class_logits: torch.Tensor, top_k: int = 100
                         ) -> list[dict[str, torch.Tensor]]:
    """Official EoMT instance output: top-k over (query x class) probabilities, no-object excluded.

    Returns per image ``masks`` [k, h, w] bool (logit > 0), ``labels`` [k], ``scores`` [k]
    (class probability x mean mask probability inside the mask).
    """
    B, Q, C1 = class_logits.shape
    results = []
    for b in range(B):
        probs = class_logits[b].softmax(-1)[:, :-1]  # [Q, C]
        k = min(top_k, probs.numel())
        scores, flat = probs.flatten().topk(k)
        q_idx, labels = flat // (C1 - 1), flat % (C1 - 1)
        logits = mask_logits[b, q_idx]
        masks = logits > 0
        mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
        results.append({"masks": masks, "labels": labels, "scores": scores * mask_scores})
    return results


def panoptic_predictions(mask_logits: torch.Tensor, class_logits: torch.Tensor, stuff_classes: set[int] = frozenset(),
                         mask_thresh: float = 0.8, overlap_thresh: float = 0.8) -> list[dict[str, torch.Tensor]]:
    """Mask2Former-style panoptic merge (official EoMT thresholds).

    Returns per image ``segments`` [h, w] (segment id, -1 = void) and ``classes`` [h, w] (class, -1 = void).
    """
    results = []
    for b in range(mask_logits.shape[0]):
        scores, labels = class_logits[b].softmax(-1).max(-1)
        num_classes = class_logits.shape[-1] - 1
        keep = (labels != num_classes) & (scores > mask_thresh)
        probs = mask_logits[b][keep].sigmoid()
        s, lab = scores[keep], labels[keep]
        h, w = mask_logits.shape[-2:]
        seg = torch.full((h, w), -1, dtype=torch.long, device=mask_logits.device)
        cls = torch.full((h, w), -1, dtype=torch.long, device=mask_logits.device)
        if len(s):
            owner = (s[:, None, None] * probs).argmax(0)
            next_id, stuff_ids = 0, {}
            for k in range(len(s)):
                area = (probs[k] >= 0.5).sum()
                region = (owner == k) & (probs[k] >= 0.5)
                if area == 0 or region.sum() / area < overlap_thresh:
                    continue
                c = int(lab[k])
                if c in stuff_classes:
                    sid = stuff_ids.setdefault(c, next_id)
                    next_id += sid == next_id
                else:
                    sid, next_id = next_id, next_id + 1
                seg[region], cls[region] = sid, c
        results.append({"segments": seg, "classes": cls})
    return results
