"""Spatial vs sequential architectures for Bragg-peak segmentation under equal compute budgets (issue 16).

    python benchmarks/architectures.py --out arch_out            # every row, budgets 2,5,10 min, seeds 0,1
    python benchmarks/architectures.py --rows unet,eomt_tiny --budgets 2,5 --seeds 0,1,2
    python benchmarks/architectures.py --quick --out arch_quick   # smoke run: 0.05/0.1-min budgets, 1 shot

Rows (``--rows``, default all; a row that cannot run says why and is skipped):

=================== =====================================================================================
``eomt_tiny``       EoMT as the main job trains it (``model=eomt_tiny``): DINOv2-style ViT 96-d x 6, patch 8,
                    8 queries, 2 query blocks, full-resolution masks
``eomt_s16``        EoMT ViT-S/16 (``model=eomt_dinov2_vits14``: DINOv2 ViT-S/14-reg4 architecture with a
                    16-px patch, 32 queries, 3 query blocks, masks at stride 2), random init
``vit_tiny_sfp``    eomt_tiny's ViT at patch 16 (vitkit's SimpleFeaturePyramid works on the stride-16 grid)
                    + SimpleFeaturePyramid (strides 4-32, 64 ch) + FPN top-down fuse + pixel-shuffle head
``vit_s_sfp``       eomt_s16's ViT-S/16 + SimpleFeaturePyramid (128 ch) + the same FPN fuse and head
``unet``            conv U-Net in PeakNet v1's family: 4 resolutions (1, 1/2, 1/4, 1/8), widths 16-32-64-128,
                    two 3x3 conv + BatchNorm + ReLU per level, transposed-conv up, skip concatenation (PeakNet
                    v1 was an attention U-Net of base width 8; attention gates are left out here)
``convnext_fpn``    torchvision ``convnext_tiny(weights=None)`` with a 1-channel stem + torchvision
                    ``FeaturePyramidNetwork`` (128 ch, strides 4-32) + the pixel-shuffle head
``eomt_s16_dinov2`` ``eomt_s16`` initialised from Meta's DINOv2 ViT-S/14-reg4 checkpoint through vitkit's own
                    loading (``pretrained=True``): runs only when the file is already local (never downloads)
``eomt_tiny_ssl``   ``eomt_tiny`` from a self-supervised checkpoint of vitkit's own on simulated panels: vitkit
                    has no self-supervised recipe, so nothing was pretrained; ``--ssl-checkpoint PATH`` (a ViT
                    checkpoint of eomt_tiny's encoder architecture that vitkit's loader reads) runs it
=================== =====================================================================================

The dense rows (SFP, U-Net, ConvNeXt) predict one peak logit per pixel. For peak extraction they are wrapped
(:class:`DenseAsEoMT`) in EoMT's output contract, so that :class:`vitkit.apps.peaks.finder.PeakFinder` runs them
unchanged: two queries whose mask logits are ``-z`` (background) and ``z`` (peak) with fixed one-hot classes,
which makes PeakFinder's peak share ``sigmoid(z)`` exactly.

Data: the main job's pipeline (``vitkit train`` defaults, ``data=lattice``): single epix10k2M panels of simulated
lattice stills, normalised as PeakFinder normalises (``robust_normalise`` with the detector's photon unit), lone hot
pixels removed from the valid pixels, weak reflections (disks of 2 px) ignored by the loss, bad pixels ignored,
64x64 crops, half of them centred on a true peak, batch 8. To keep the simulator and normaliser (10-80 ms per panel
here) out of the training loop, each seed's ``--panels`` training panels (default 4,800, the job's ``num_train``)
are prepared once and shared by all rows; crops are then drawn exactly as the data module's ``CropDataset`` draws
them over that panel set (the same sampler, the same seeded placement: a test checks the equality). Seed ``s`` gives
every row the same panels (data seed ``s``), the same crop sequence and ``lightning.seed_everything(s)`` before the
model is built.

Training: AdamW (lr 1e-3, weight decay 0.05, layer-wise decay 0.9 on ViT blocks: the job's ``module`` config),
gradient clipping 1.0, linear warm-up over 50 steps then a **constant** learning rate, so the snapshot at 2 or
5 minutes of a 10-minute run is the model a 2- or 5-minute run gives. EoMT rows run the job's
``SegmentationModule.training_step`` (Hungarian matching, point-sampled mask BCE + dice + class CE, deep
supervision); their masked-attention annealing runs on the budget clock and ends at 80 % of the smallest budget
(so every snapshot is a plain-ViT inference model). Dense rows: per-pixel BCE + dice over the valid pixels
(:func:`vitkit.tasks.loss.pairwise_bce` / ``pairwise_dice``, weights 5 / 5 as EoMT's mask terms).

Budget: **process CPU time divided by the number of torch threads**, summed over the training steps (forward, loss,
backward, optimiser); batch assembly and evaluation are outside it. On a quiet machine it equals the steps' wall
time. With one thread it ignores other load (a descheduled process accrues no CPU time). With several threads it
does not: PyTorch's OpenMP threads spin while they wait for a sibling that another process has descheduled, and the
spinning is CPU time. Measured on this 2-core machine with one core taken by another process: a 3x3 conv took 26 ms
of CPU instead of 2.7 ms (OMP_WAIT_POLICY=PASSIVE: 2.7 ms). So each run records the cores other processes used
during it and flags runs above 0.25; run on a quiet machine, or pass ``--threads 1`` or ``--omp-passive`` (idle
threads sleep: robust to other load, but the serial parts of a step, such as EoMT's Hungarian matching, then count
1/threads of their wall time, and small kernels get slower; measured under a load of ~1.5 foreign cores:
vit_tiny_sfp made 59 steps in 3 s of clock with --omp-passive, 2 steps without). The steps' wall time is recorded
beside the clock. Every (row, seed) trains once up to the largest budget; the snapshot at each smaller budget is
taken at the first step that reaches it.

Evaluation: ``vitkit evaluate``'s code on whole held-out epix10k2M shots (the held-out split of data seed 0:
simulator seed 2, disjoint from every training seed ``10 s``): ``PeakFinder`` with the job's ``predict`` settings
(64 x 64 windows, overlap 0.25, threshold 0.6, hysteresis, min 3 px), ``job.predict`` and ``job.evaluate``
(peaks matched one-to-one within 2 px, weak reflections don't-care). Recall by true-peak intensity: tertiles of
the true peaks' photons on the held-out shots (edges printed); a bin's recall matches the predictions against
that bin's true peaks only. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over PeakFinder's model pass
on one 352 x 384 panel (its 56 windows; stock kernels while counting). Panels/s: the model pass on one 16-panel
event (``semantic_inference``, 32 windows per batch), the rows interleaved in one process, median of the
repetitions (calls during which other processes used > 0.25 cores are repeated).

Output (``--out``): ``architectures.md`` (the table and the method), ``architectures.json`` (everything, per seed
and budget, with loss traces) and ``architectures.png`` (F1 vs budget with the spread over seeds; F1 vs panels/s
at the largest budget).
"""

from __future__ import annotations

import os
import sys

if "--omp-passive" in sys.argv:  # read by OpenMP when torch loads it: set before the import
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import OrderedDict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TEST_DATA_SEED = 0   # held-out shots: the test split of data seed 0 (LatticeStillsDataset seed 2), for every run
TICK = 0.1           # s of budget clock per annealing "step"
BATCH_PANELS = 16    # panels per timed inference call (one epix10k2M event)
CONTENDED = (" -- CONTENDED: OpenMP threads spin while waiting for a descheduled sibling and that spinning is "
             "process CPU time, so this run did less work per budget minute (quiet machine, --threads 1 or "
             "--omp-passive)")


# ------------------------------------------------------------------------------------------- dense models
class PixelShuffleHead(nn.Module):
    """A light head from a stride-``s`` map to full-resolution logits: 3x3 conv, GELU, 1x1 conv to ``s * s``
    sub-pixel logits, pixel shuffle (``[B, C, H/s, W/s] -> [B, 1, H, W]``): sharp few-pixel masks without a
    full-resolution conv."""

    def __init__(self, width: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.GELU()
        self.out = nn.Conv2d(width, stride * stride, 1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.out(self.act(self.conv(x))))


class FPNSegmenter(nn.Module):
    """Multi-scale features (highest resolution first, the finest at stride ``stride``) -> torchvision's
    ``FeaturePyramidNetwork`` (top-down fuse) -> :class:`PixelShuffleHead` on the finest level."""

    def __init__(self, features: nn.Module, in_channels: list[int], width: int, stride: int = 4):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.features = features
        self.fpn = FeaturePyramidNetwork(in_channels, width)
        self.head = PixelShuffleHead(width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        fused = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        return self.head(next(iter(fused.values())))


class ConvNeXtFeatures(nn.Module):
    """torchvision ConvNeXt stages as a pyramid ``[C4, C8, C16, C32]``, with a 1-channel stem."""

    def __init__(self, arch: str = "convnext_tiny"):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stride=stem.stride)
        self.stages = net.features
        # features: stem, stage, downsample, stage, ... ; a stage's width is its first block's depthwise conv
        self.channels = [net.features[i][0].block[0].in_channels for i in (1, 3, 5, 7)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in (1, 3, 5, 7):
                out.append(x)
        return out


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Plain U-Net: ``len(widths)`` resolutions, two conv-BN-ReLU per level, max-pool down, transposed conv up,
    skip concatenation, 1x1 conv to one logit at full resolution."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), in_chans: int = 1):
        super().__init__()
        self.down = nn.ModuleList()
        c = in_chans
        for w in widths:
            self.down.append(_double_conv(c, w))
            c = w
        self.up = nn.ModuleList(nn.ConvTranspose2d(w2, w1, 2, stride=2) for w1, w2 in zip(widths[:-1], widths[1:]))
        self.merge = nn.ModuleList(_double_conv(2 * w1, w1) for w1 in widths[:-1])
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(reversed(self.up), reversed(self.merge)):
            x = merge(torch.cat([skips.pop(), up(x)], 1))
        return self.out(x)


class DenseAsEoMT(nn.Module):
    """A per-pixel one-logit segmenter seen through EoMT's output contract (what PeakFinder runs).

    ``forward(x)`` returns ``([mask_logits [B, 2, H, W]], [class_logits [B, 2, 3]])``: query 0 has mask logit
    ``-z`` and class background, query 1 mask logit ``z`` and class peak (one-hot classes, no-object never
    chosen). :func:`vitkit.tasks.postprocess.semantic_probs` then gives background ``1 - sigmoid(z)`` and peak
    ``sigmoid(z)``: their sum is 1, so PeakFinder's thresholds apply to ``sigmoid(z)`` directly.
    """

    num_classes = 2

    def __init__(self, net: nn.Module, img_size: tuple[int, int]):
        super().__init__()
        self.net = net
        self._img_size = (int(img_size[0]), int(img_size[1]))
        classes = torch.full((2, 3), -1e4)  # exp(-1e4) is 0 in float32: the softmax is exactly one-hot
        classes[0, 0] = classes[1, 1] = 0.0
        self.register_buffer("classes", classes, persistent=False)

    @property
    def img_size(self) -> tuple[int, int]:
        """The window PeakFinder tiles panels into (the training crop, as for EoMT)."""
        return self._img_size

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        z = self.net(x)
        return [torch.cat([-z, z], 1)], [self.classes[None].expand(x.shape[0], -1, -1).to(z.dtype)]


def dense_loss(logits: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, mask_coefficient: float = 5.0,
               dice_coefficient: float = 5.0) -> torch.Tensor:
    """Per image, BCE + dice of the peak logit over its valid pixels (EoMT's mask-term formulas and weights,
    :func:`vitkit.tasks.loss.pairwise_bce` / ``pairwise_dice``, on every valid pixel); mean over the batch."""
    from vitkit.tasks.loss import pairwise_bce, pairwise_dice

    terms = []
    for b in range(logits.shape[0]):
        ok = valid[b]
        if not bool(ok.any()):
            continue
        z = logits[b, 0][ok][None]
        t = (label[b][ok] > 0).to(z.dtype)[None]
        terms.append(mask_coefficient * pairwise_bce(z, t)[0, 0] + dice_coefficient * pairwise_dice(z, t)[0, 0])
    return torch.stack(terms).mean() if terms else logits.sum() * 0.0


# ------------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    label: str
    kind: str                                   # "eomt" (SegmentationModule) or "dense" (DenseAsEoMT)
    build: Callable[[Any, argparse.Namespace], nn.Module]
    vit_prefix: str = "encoder."                # parameter prefix of the ViT (layer-wise LR decay)
    skip: Callable[[argparse.Namespace], str | None] = lambda args: None   # why the row cannot run, or None


def _model_cfg(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from vitkit.apps.peaks.job import compose

    return OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True)


def _eomt(name: str, **override: Any) -> Callable[[Any, argparse.Namespace], nn.Module]:
    def build(cfg, args) -> nn.Module:
        from hydra.utils import instantiate

        return instantiate({**_model_cfg(name), **override})

    return build


def _eomt_tiny_ssl(cfg, args) -> nn.Module:
    """eomt_tiny with its encoder loaded (strictly, by vitkit's loader) from ``--ssl-checkpoint``."""
    return _eomt("eomt_tiny", pretrained=str(args.ssl_checkpoint))(cfg, args)


_TINY_VIT = dict(patch_size=16, embed_dim=96, depth=6, num_heads=4, num_register_tokens=4)  # eomt_tiny's, patch 16


def _sfp(width: int, **vit: Any) -> Callable[[Any, argparse.Namespace], nn.Module]:
    def build(cfg, args) -> nn.Module:
        import vitkit

        crop = tuple(cfg.data.crop)
        trunk = vitkit.SimpleFeaturePyramid("dinov2_vits14_reg", pretrained=False, img_size=crop, in_chans=1,
                                            out_channels=width, **vit)
        return DenseAsEoMT(FPNSegmenter(trunk, list(trunk.channel_list), width, stride=min(trunk.strides)), crop)

    return build


def _unet(cfg, args) -> nn.Module:
    return DenseAsEoMT(UNet((16, 32, 64, 128)), tuple(cfg.data.crop))


def _convnext(cfg, args) -> nn.Module:
    feats = ConvNeXtFeatures("convnext_tiny")
    return DenseAsEoMT(FPNSegmenter(feats, feats.channels, 128, stride=4), tuple(cfg.data.crop))


def _dinov2_missing(args) -> str | None:
    """None when DINOv2 ViT-S/14-reg4 weights are on this machine where vitkit's loader looks, else why not."""
    import vitkit
    from vitkit.weights import hub

    p = vitkit.get_preset("dinov2_vits14_reg")
    found = hub.local_file(p.filename, p.hf_id) if p.filename else None
    if found is None and p.hf_id:
        found = hub.hf_snapshot(p.hf_id)
    if found is not None:
        return None
    return (f"DINOv2 weights not on this machine (offline; vitkit never downloads here): put {p.filename} into "
            f"{hub.vitkit_home()} or a snapshot of {p.hf_id} into the Hugging Face cache to run this row")


def _ssl_missing(args) -> str | None:
    if args.ssl_checkpoint is not None:
        return None if Path(args.ssl_checkpoint).exists() else f"--ssl-checkpoint {args.ssl_checkpoint} not found"
    return ("not tried: vitkit has no self-supervised pretraining recipe (no MAE / DINO / iBOT objective in "
            "vitkit), so no checkpoint pretrained on simulated panels exists; pass --ssl-checkpoint PATH (eomt_tiny's "
            "encoder architecture) to run this row")


ROWS: dict[str, Row] = {
    "eomt_tiny": Row("EoMT-tiny (ViT 96x6, p8)", "eomt", _eomt("eomt_tiny")),
    "eomt_s16": Row("EoMT ViT-S/16", "eomt", _eomt("eomt_dinov2_vits14")),
    "vit_tiny_sfp": Row("ViT-tiny/16 + SFP + FPN", "dense", _sfp(64, **_TINY_VIT), vit_prefix="net.features.vit."),
    "vit_s_sfp": Row("ViT-S/16 + SFP + FPN", "dense", _sfp(128, patch_size=16), vit_prefix="net.features.vit."),
    "unet": Row("U-Net 16-128 (4 levels)", "dense", _unet),
    "convnext_fpn": Row("ConvNeXt-T + FPN", "dense", _convnext),
    "eomt_s16_dinov2": Row("EoMT ViT-S/16, DINOv2 init", "eomt", _eomt("eomt_dinov2_vits14", pretrained=True),
                           skip=_dinov2_missing),
    "eomt_tiny_ssl": Row("EoMT-tiny, vitkit SSL init", "eomt", _eomt_tiny_ssl,
                         skip=_ssl_missing),
}


# ------------------------------------------------------------------------------------------------- data
class _Memo:
    """A source that remembers the last item it returned (its truth peaks, after CropDataset read it)."""

    def __init__(self, source):
        self.source, self.last = source, None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        self.last = self.source[i]
        return self.last


class _PreparedPanels(torch.utils.data.Dataset):
    """Panel ``i`` of a training source exactly as the data module's ``CropDataset`` prepares it before cropping
    (normalised, lone pixels and weak-reflection disks out of ``valid``, padded to the crop), plus its peaks."""

    def __init__(self, source, crop: tuple[int, int], seed: int, peak_bias: float, detector):
        from vitkit.apps.peaks.datamodule import CropDataset
        from vitkit.apps.peaks.peakfind import LONE_PIXEL_RATIO

        self.memo = _Memo(source)
        h, w = np.shape(source[0]["label"])[-2:]
        self.shape = (max(h, crop[0]), max(w, crop[1]))
        # the whole (padded) panel as the "crop": sigma=None is a deterministic crop at the origin
        self.whole = CropDataset(self.memo, self.shape, None, seed, peak_bias, True, detector=detector,
                                 lone_pixel_ratio=LONE_PIXEL_RATIO)

    def __len__(self) -> int:
        return len(self.memo)

    def __getitem__(self, i: int):
        out = self.whole[i]
        peaks = self.memo.last.get("peaks")
        peaks = torch.zeros(0, 3) if peaks is None else torch.as_tensor(np.asarray(peaks), dtype=torch.float32)
        return out["image"], out["label"].to(torch.uint8), out["valid"], peaks


class PanelPool:
    """``n`` training panels prepared once; crops drawn as ``CropDataset`` draws them for a lattice source.

    ``crop(key)`` equals ``CropDataset(source, crop, sigma, seed, peak_bias, uniform=True, ...)[key]`` of the
    data module (its placement rule, :meth:`CropDataset.box`); ``batches()`` yields the batches its training
    loader yields (the ``EpochSeededSampler`` order, ``drop_last``)."""

    def __init__(self, data_cfg: dict[str, Any], seed: int, n: int, workers: int = 0, progress: bool = True):
        from vitkit.apps.peaks.datamodule import CropDataset, PeakDataModule

        if data_cfg["source"] != "lattice":
            raise ValueError(f"the architectures benchmark trains on lattice panels, not data.source="
                             f"{data_cfg['source']!r}")
        if n < int(data_cfg["batch_size"]):
            raise ValueError(f"{n} training panels give no batch of {data_cfg['batch_size']} (the loader drops the "
                             f"last incomplete batch); use at least batch_size panels")
        dm = PeakDataModule(**{**data_cfg, "seed": seed, "num_train": n})
        self.detector, self.seed, self.n = dm.detector, seed, n
        self.crop_hw = tuple(data_cfg["crop"])
        self.peak_bias = float(data_cfg["peak_bias"])
        # the data module's crop placement (peaks, hard negatives, else uniform), applied to the prepared panels
        self.placer = CropDataset(None, self.crop_hw, 0.33, seed, self.peak_bias, True,
                                  negative_bias=float(data_cfg.get("negative_bias", 0.0)))
        self.batch_size = int(data_cfg["batch_size"])
        prep = _PreparedPanels(dm.frames("train"), self.crop_hw, seed, self.peak_bias, self.detector)
        hp, wp = prep.shape
        self.images = torch.empty(n, 1, hp, wp)
        self.labels = torch.empty(n, hp, wp, dtype=torch.uint8)
        self.valid = torch.empty(n, hp, wp, dtype=torch.bool)
        self.peaks: list[np.ndarray] = [np.zeros((0, 3))] * n
        loader = torch.utils.data.DataLoader(prep, batch_size=None, num_workers=workers)
        t0 = time.perf_counter()
        for i, (img, lab, val, pk) in enumerate(loader):
            self.images[i], self.labels[i], self.valid[i], self.peaks[i] = img, lab, val, pk.numpy()
            if progress and (i + 1) % max(1, n // 5) == 0:
                print(f"  prepared {i + 1}/{n} panels ({time.perf_counter() - t0:.0f} s)", flush=True)
        self.prepare_s = time.perf_counter() - t0

    def __len__(self) -> int:
        return self.n

    def crop(self, key: int) -> dict[str, torch.Tensor]:
        from vitkit.tasks.transforms import crop_at

        i = key % self.n
        H, W = self.crop_hw
        top, left = self.placer.box(key, self.images[i], self.labels[i], self.valid[i], self.peaks[i],
                                    tuple(self.images.shape[-2:]))
        return {"image": crop_at(self.images[i], top, left, H, W),
                "label": crop_at(self.labels[i], top, left, H, W).long(),
                "valid": crop_at(self.valid[i], top, left, H, W)}

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        from vitkit.apps.peaks.datamodule import EpochSeededSampler

        sampler = EpochSeededSampler(self.n, self.seed, {"epochs_served": 0})
        bs = self.batch_size
        while True:
            keys = list(iter(sampler))
            for j in range(0, len(keys) - bs + 1, bs):
                items = [self.crop(k) for k in keys[j:j + bs]]
                yield {name: torch.stack([it[name] for it in items]) for name in items[0]}


# --------------------------------------------------------------------------------------------- training
def _module_cfg(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    mc = OmegaConf.to_container(cfg.module, resolve=True)
    mc["schedule"] = "constant"  # warm-up then constant: snapshots equal shorter runs
    return mc


def train_run(name: str, row: Row, model: nn.Module, pool: PanelPool, budgets_s: list[float], cfg,
              quiet: bool = False) -> dict[str, Any]:
    """Train ``model`` on ``pool``'s batches until the budget clock reaches ``max(budgets_s)``; returns the
    state dict (a copy) at each budget, the steps and clocks there, and a loss trace."""
    from vitkit.tasks.annealing import MaskAnnealing
    from vitkit.tasks.train import SegmentationModule, layerwise_param_groups, warmup_decay_lambda

    mc = _module_cfg(cfg)
    clip = float(cfg.trainer.get("gradient_clip_val") or 0.0)
    threads = torch.get_num_threads()
    clock = 0.0
    model.train()
    if row.kind == "eomt":
        module = SegmentationModule(model, **mc)
        end = max(model.num_blocks + 1, int(0.8 * min(budgets_s) / TICK))
        module.annealing = MaskAnnealing.sequential(model.num_blocks, 0, end, module.hparams.anneal_power)

        def loss_of(batch, i):
            module.annealing.apply(model, int(clock / TICK))  # annealed on the budget clock, not on steps
            return module.training_step(batch, i)
    else:
        def loss_of(batch, i):
            return dense_loss(model.net(batch["image"]), batch["label"], batch["valid"])

    groups = layerwise_param_groups(model, mc["lr"], mc["weight_decay"], mc["llrd"], backbone_prefix=row.vit_prefix)
    opt = torch.optim.AdamW(groups, lr=mc["lr"], weight_decay=mc["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay_lambda(1, mc["warmup_steps"], "constant"))
    params = [p for p in model.parameters() if p.requires_grad]
    todo = sorted(budgets_s)
    snaps: dict[float, dict[str, Any]] = {}
    trace, window = [], []
    wall = 0.0
    step = 0
    report_every = max(budgets_s) / 10
    next_report = report_every
    status = "ok"
    batches = pool.batches()
    load = common.ForeignLoad()  # other processes' cores during the run: contention inflates the budget clock
    load.start()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; no Trainer here
        while todo:
            batch = next(batches)
            c0, w0 = time.process_time(), time.perf_counter()
            loss = loss_of(batch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            clock += (time.process_time() - c0) / threads
            wall += time.perf_counter() - w0
            step += 1
            value = float(loss.detach())
            window.append(value)
            if not math.isfinite(value):
                status = f"diverged: loss {value} at step {step}"
                print(f"  {name}: {status}", flush=True)
                break
            if step % 25 == 0:
                trace.append((step, round(clock, 2), statistics.fmean(window)))
                window = []
            if not quiet and clock >= next_report:
                print(f"  {name}: step {step}, {clock:.0f} s budget clock ({wall:.0f} s wall), loss "
                      f"{trace[-1][2] if trace else value:.3f}", flush=True)
                next_report += report_every
            while todo and clock >= todo[0]:
                b = todo.pop(0)
                snaps[b] = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                            "steps": step, "clock_s": clock, "wall_s": wall}
    return {"snapshots": snaps, "status": status, "loss_trace": trace, "steps": step, "clock_s": clock,
            "wall_s": wall, "threads": threads, "other_processes_cores": load.stop()}


# ------------------------------------------------------------------------------------------- evaluation
@dataclass
class HeldOut:
    items: list
    masks: list
    peaks: list
    weak: list | None
    photons: list            # per event, per panel: [n, 3] (ss, fs, photons) of the true peaks
    edges: tuple[float, float]


def held_out(cfg, shots: int, detector) -> HeldOut:
    """The held-out shots (``vitkit evaluate``'s source for data seed ``TEST_DATA_SEED``), read once."""
    from omegaconf import OmegaConf

    from vitkit.apps.peaks.datamodule import make_source
    from vitkit.apps.peaks.job import truth_of

    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(seed=TEST_DATA_SEED, num_test=shots, detector=detector)
    source = make_source("test", **{k: v for k, v in data.items() if k not in ("crop", "polar_crop_sigma")})
    items = [source[i] for i in range(len(source))]
    masks, peaks, weak = truth_of(items)
    photons = [[np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in it["peaks"]] for it in items]
    allp = np.concatenate([p[:, 2] for ev in photons for p in ev]) if items else np.zeros(0)
    edges = tuple(float(v) for v in np.quantile(allp, [1 / 3, 2 / 3])) if len(allp) else (0.0, 0.0)
    return HeldOut(items, masks, peaks, weak, photons, edges)


def recall_by_bin(tables: list, ho: HeldOut, radius: float) -> dict[str, Any]:
    """Recall of the weak / medium / strong tertile of true peaks (predictions matched one-to-one within
    ``radius`` against that bin's true peaks only, panel by panel)."""
    from vitkit.apps.peaks.metrics import peak_metrics

    out = {}
    lo, hi = ho.edges
    for name, keep in (("weak", lambda v: v < lo), ("medium", lambda v: (v >= lo) & (v < hi)),
                       ("strong", lambda v: v >= hi)):
        pred, true = [], []
        for t, ev in zip(tables, ho.photons):
            for k, p in enumerate(ev):
                sel = t[t["panel"] == k]
                pred.append(np.stack([sel["ss"], sel["fs"]], 1))
                true.append(p[keep(p[:, 2])][:, :2])
        m = peak_metrics(pred, true, radius=radius)
        out[f"recall_{name}"] = m["peak_recall"]
        out[f"n_true_{name}"] = m["n_true"]
    return out


def evaluate_model(model: nn.Module, detector, ho: HeldOut, pk) -> dict[str, Any]:
    """``vitkit evaluate`` on the held-out shots: PeakFinder as the job builds it, ``job.predict``,
    ``job.evaluate``; plus recall by intensity bin and the finder's events/s."""
    from vitkit.apps.peaks.finder import PeakFinder
    from vitkit.apps.peaks.job import evaluate, predict

    finder = PeakFinder(model, detector, good=None, overlap=pk.overlap, min_pixels=pk.min_pixels,
                        min_peaks=pk.min_peaks, max_peaks=pk.max_peaks, threshold=pk.threshold)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = predict(finder, ho.items, Path(tmp), overlays=0, keep_masks=True, progress=False)
        dt = time.perf_counter() - t0
    m = evaluate(res["masks"], res["peaks"], ho.masks, ho.peaks, radius=pk.radius, weak=ho.weak)
    m.update(recall_by_bin(res["peaks"], ho, pk.radius))
    m["finder_events_per_s"] = len(ho.items) / dt if dt > 0 else float("nan")
    return m


def flops_per_panel(model: nn.Module, panel: torch.Tensor, pk) -> float:
    """FLOPs of PeakFinder's model pass over one panel ``[1, 1, H, W]`` (all its windows), stock kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitkit import kernels
    from vitkit.tasks.postprocess import semantic_inference

    prev = kernels.set_mode("stock")  # tuned oneDNN calls are invisible to the counter
    try:
        with FlopCounterMode(display=False) as fc:
            semantic_inference(model, panel, overlap=pk.overlap, batch_size=32)
    finally:
        kernels.set_mode(prev)
    return float(fc.get_total_flops())


def normalised_event(ho: HeldOut, detector) -> torch.Tensor:
    """The first held-out event's panels ``[P, 1, H, W]`` normalised as PeakFinder normalises them."""
    from vitkit.apps.peaks.finder import event_good
    from vitkit.tasks.transforms import robust_normalise

    item = ho.items[0]
    ev = np.asarray(item["image"], dtype=np.float32).reshape(-1, *np.shape(item["label"])[-2:])
    unit = detector.photon_adu()
    good = event_good(ev, np.asarray(item["good"], dtype=bool), unit)
    x = torch.from_numpy(ev)[:, None]
    return robust_normalise(x, torch.from_numpy(good)[:, None], unit=torch.as_tensor(unit).float())


# --------------------------------------------------------------------------------------------- report
def _stats(vals: list[float]) -> dict[str, float]:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def summarise(rows_doc: dict[str, Any], budgets: list[float]) -> list[dict[str, Any]]:
    out = []
    for name, d in rows_doc.items():
        if d["status"] != "ok":
            continue
        for b in budgets:
            runs = [r["budgets"][str(b)] for r in d["runs"].values() if str(b) in r["budgets"]]
            if not runs:
                continue
            s = {"row": name, "budget_min": b, "seeds": len(runs)}
            for key in ("peak_f1", "peak_precision", "peak_recall", "recall_weak", "recall_medium", "recall_strong",
                        "centroid_rmse_px", "pixel_iou"):
                s[key] = _stats([r["metrics"][key] for r in runs])
            s["steps"] = _stats([r["steps"] for r in runs])
            s["params"], s["flops_per_panel"] = d["params"], d.get("flops_per_panel")
            s["panels_per_s"] = d.get("panels_per_s")
            out.append(s)
    return out


def table(summary: list[dict[str, Any]], rows_doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["row", "budget min", "seeds", "F1 mean [min-max]", "precision", "recall", "recall weak/med/strong",
               "RMSE px", "steps", "params M", "GFLOP/panel", "panels/s"]
    rows = []
    for s in summary:
        f = s["peak_f1"]
        spread = f"[{fmt(f['min'])}-{fmt(f['max'])}]" if s["seeds"] > 1 else "(1 seed)"
        rows.append([f"{s['row']} ({rows_doc[s['row']]['label']})", fmt(s["budget_min"], "g"), str(s["seeds"]),
                     f"{fmt(f['mean'])} {spread}", fmt(s["peak_precision"]["mean"]), fmt(s["peak_recall"]["mean"]),
                     "/".join(fmt(s[f"recall_{k}"]["mean"], ".2f") for k in ("weak", "medium", "strong")),
                     fmt(s["centroid_rmse_px"]["mean"], ".2f"), fmt(s["steps"]["mean"], ".0f"),
                     fmt(s["params"] / 1e6, ".2f"), fmt((s["flops_per_panel"] or float("nan")) / 1e9, ".1f"),
                     fmt(s["panels_per_s"], ".1f")])
    return headers, rows


def plot(summary: list[dict[str, Any]], budgets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    names = list(dict.fromkeys(s["row"] for s in summary))
    for name in names:
        ss = [s for s in summary if s["row"] == name]
        x = [s["budget_min"] for s in ss]
        y = [s["peak_f1"]["mean"] for s in ss]
        err = [[s["peak_f1"]["mean"] - s["peak_f1"]["min"] for s in ss],
               [s["peak_f1"]["max"] - s["peak_f1"]["mean"] for s in ss]]
        color = a1.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)[0].get_color()
        last = [s for s in ss if s["budget_min"] == max(budgets)]
        if last and last[0]["panels_per_s"]:
            s = last[0]
            f = s["peak_f1"]
            a2.errorbar([s["panels_per_s"]], [f["mean"]], yerr=[[f["mean"] - f["min"]], [f["max"] - f["mean"]]],
                        marker="o", capsize=3, color=color)
            a2.annotate(name, (s["panels_per_s"], s["peak_f1"]["mean"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
    a1.set_xlabel("training budget (min of CPU time / torch threads)")
    a1.set_ylabel("peak F1, held-out epix10k2M shots")
    a1.set_title("F1 vs budget (error bars: min-max over seeds)")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_xscale("log")
    a2.set_xlabel("panels/s (352 x 384, model pass, this machine)")
    a2.set_ylabel("peak F1")
    a2.set_title(f"F1 at {max(budgets):g} min vs inference speed")
    a2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


METHOD = """\
- Data: the main job's pipeline (`vitkit train` defaults): single epix10k2M panels of simulated lattice stills, \
normalised as PeakFinder normalises, lone hot pixels and bad pixels out of the loss, weak reflections ignored, 64x64 \
crops (half centred on a true peak), batch 8. {panels} training panels per seed, prepared once and shared by all \
rows; crops drawn as the data module's CropDataset draws them. Seed s: data seed s and seed_everything(s).
- Budget: process CPU time / torch threads ({threads}) over the training steps only; snapshots of one run per \
(row, seed) at each budget. LR: AdamW 1e-3, wd 0.05, llrd 0.9 on ViT blocks, 50 warm-up steps then constant; \
gradient clip 1.0. EoMT: SegmentationModule.training_step, mask annealing on the budget clock, done at 80 % of the \
smallest budget. Dense rows: BCE + dice over valid pixels (weights 5/5).
- Evaluation: `vitkit evaluate`'s code (PeakFinder with the job's predict settings, job.predict, job.evaluate: \
2 px one-to-one matching, weak reflections don't-care) on {shots} held-out shots (data seed {test_seed}'s test \
split), {n_true} true peaks. Recall bins: tertiles of true photons, edges {edges}.
- FLOPs: FlopCounterMode over PeakFinder's model pass on one 352x384 panel (56 windows of 64x64, overlap 0.25). \
panels/s: the model pass on one 16-panel event, rows interleaved, median of {reps}."""


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("arch_out"), help="output directory (default arch_out)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all): {', '.join(ROWS)}")
    ap.add_argument("--budgets", default=None, help="training budgets in minutes (default 2,5,10; --quick 0.05,0.1)")
    ap.add_argument("--seeds", default=None, help="seeds, each trained to the largest budget (default 0,1)")
    ap.add_argument("--shots", type=int, default=None, help="held-out epix10k2M shots (default 8 as the job; quick 1)")
    ap.add_argument("--panels", type=int, default=None,
                    help="training panels per seed (default 4800, the job's num_train; quick 16)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--workers", type=int, default=None, help="processes preparing panels (default 2; quick 0)")
    ap.add_argument("--reps", type=int, default=None, help="timed inference calls per row (default 5; quick 1)")
    ap.add_argument("--ssl-checkpoint", type=Path, default=None,
                    help="a self-supervised ViT checkpoint for the eomt_tiny_ssl row")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, so their waiting is "
                         "not budget (for a shared machine; serial parts of a step then count 1/threads)")
    ap.add_argument("--quick", action="store_true", help="smoke run: budgets 0.05,0.1 min, seed 0, 1 shot, 16 panels")
    args = ap.parse_args(argv)
    q = args.quick
    args.budgets = sorted({float(b) for b in (args.budgets or ("0.05,0.1" if q else "2,5,10")).split(",")})
    args.seeds = [int(s) for s in (args.seeds or ("0" if q else "0,1")).split(",")]
    args.shots = args.shots or (1 if q else 8)
    args.panels = args.panels or (16 if q else 4800)
    args.workers = (0 if q else 2) if args.workers is None else args.workers
    args.reps = args.reps or (1 if q else 5)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import lightning as L
    from omegaconf import OmegaConf

    from vitkit.apps.peaks.job import compose

    args = parse_args(argv)
    common.setup_process(args.threads)
    env = common.environment()
    common.print_header(env)
    threads = torch.get_num_threads()
    budgets_s = [b * 60 for b in args.budgets]
    print(f"budget  : process CPU time / {threads} torch threads, over the training steps only (on a quiet machine "
          f"= their wall time); budgets {', '.join(f'{b:g}' for b in args.budgets)} min, seeds "
          f"{', '.join(map(str, args.seeds))}")
    cfg = compose([])
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    pk = cfg.predict
    args.out.mkdir(parents=True, exist_ok=True)

    rows_doc: dict[str, Any] = {}
    runnable = []
    for name in args.rows:
        row = ROWS[name]
        why = row.skip(args)
        rows_doc[name] = {"label": row.label, "kind": row.kind, "status": "ok" if why is None else f"skipped: {why}"}
        if why is None:
            runnable.append(name)
        else:
            print(f"row {name}: skipped: {why}")
    est = len(runnable) * len(args.seeds) * max(args.budgets)
    print(f"rows    : {', '.join(runnable) or '-'}; training alone takes >= {est:.1f} min of budget clock")

    from vitkit.apps.peaks.detector import load_detector

    det = load_detector(data_cfg["detector"])
    t0 = time.perf_counter()
    ho = held_out(cfg, args.shots, det)
    n_true = sum(len(p) for ev in ho.photons for p in ev)
    print(f"held out: {len(ho.items)} shots (data seed {TEST_DATA_SEED} test split), {n_true} true peaks, "
          f"photon tertile edges {ho.edges[0]:.0f} / {ho.edges[1]:.0f} ({time.perf_counter() - t0:.1f} s)")

    finals: dict[str, nn.Module] = {}
    for seed in args.seeds:
        print(f"\nseed {seed}: preparing {args.panels} training panels (data seed {seed})", flush=True)
        pool = PanelPool(data_cfg, seed, args.panels, args.workers, progress=not args.quick)
        print(f"  {args.panels} panels in {pool.prepare_s:.1f} s")
        for name in runnable:
            row = ROWS[name]
            d = rows_doc[name]
            L.seed_everything(seed, workers=True, verbose=False)
            try:
                model = row.build(cfg, args)
            except Exception as e:  # noqa: BLE001 - report why (e.g. weights that fail to load) and go on
                d["status"] = f"skipped: could not build: {type(e).__name__}: {e}"
                print(f"row {name}: {d['status']}")
                continue
            d["params"] = sum(p.numel() for p in model.parameters())
            print(f"{name} seed {seed}: {d['params'] / 1e6:.2f} M parameters, training to "
                  f"{max(args.budgets):g} min", flush=True)
            L.seed_everything(seed, workers=True, verbose=False)
            run = train_run(name, row, model, pool, budgets_s, cfg, quiet=args.quick)
            res = {"status": run["status"], "steps": run["steps"], "clock_s": run["clock_s"],
                   "wall_s": run["wall_s"], "other_processes_cores": run["other_processes_cores"],
                   "crops_per_panel": run["steps"] * pool.batch_size / len(pool),
                   "loss_trace": run["loss_trace"], "budgets": {}}
            busy = run["other_processes_cores"]
            print(f"  {name} seed {seed}: {run['steps']} steps, {run['clock_s']:.0f} s budget clock, "
                  f"{run['wall_s']:.0f} s wall in steps, each panel cropped {res['crops_per_panel']:.1f} times; "
                  f"other processes used {busy:.2f} cores" + (CONTENDED if busy > 0.25 and run["threads"] > 1
                                                              and not args.omp_passive else ""), flush=True)
            for b, bs in zip(args.budgets, budgets_s):
                snap = run["snapshots"].get(bs)
                if snap is None:
                    continue
                model.load_state_dict(snap["state"])
                m = evaluate_model(model, det, ho, pk)
                res["budgets"][str(b)] = {"steps": snap["steps"], "clock_s": snap["clock_s"],
                                          "wall_s": snap["wall_s"], "metrics": m}
                print(f"  {name} seed {seed} @ {b:g} min: step {snap['steps']}, F1 {m['peak_f1']:.3f} (P "
                      f"{m['peak_precision']:.3f}, R {m['peak_recall']:.3f}; weak/med/strong "
                      f"{m['recall_weak']:.2f}/{m['recall_medium']:.2f}/{m['recall_strong']:.2f}), RMSE "
                      f"{fmt(m['centroid_rmse_px'], '.2f')} px", flush=True)
            d.setdefault("runs", {})[str(seed)] = res
            if name not in finals:  # the first seed's final model is timed and counted
                finals[name] = model.eval()
            else:
                del model
        del pool

    # ---- FLOPs and speed, all rows in one process, interleaved
    if finals:
        x16 = normalised_event(ho, det)
        from vitkit.tasks.postprocess import window_starts

        for name, model in finals.items():
            f = flops_per_panel(model, x16[:1], pk)
            wins = [len(window_starts(n, w, pk.overlap)) for n, w in zip(x16.shape[-2:], model.img_size)]
            rows_doc[name].update(flops_per_panel=f, windows_per_panel=wins[0] * wins[1],
                                  flops_per_window=f / (wins[0] * wins[1]))
        from vitkit.tasks.postprocess import semantic_inference

        fns = {name: (lambda m=model: semantic_inference(m, x16[:BATCH_PANELS], overlap=pk.overlap, batch_size=32))
               for name, model in finals.items()}
        print(f"\ntiming the model pass on one {len(x16[:BATCH_PANELS])}-panel event, rows interleaved "
              f"({args.reps} reps)", flush=True)
        times, tstats = common.time_interleaved(fns, warmup=0 if args.quick else 1, reps=args.reps,
                                                max_foreign=None if args.quick else 0.25)
        for name, ts in times.items():
            med = statistics.median(ts)
            rows_doc[name]["panels_per_s"] = len(x16[:BATCH_PANELS]) / med
            rows_doc[name]["timing"] = {**common.summarize(ts), "panels": len(x16[:BATCH_PANELS])}
        timing_stats = tstats
    else:
        timing_stats = {}

    # ---- report
    summary = summarise(rows_doc, args.budgets)
    headers, trows = table(summary, rows_doc)
    notes = [f"{n}: {d['status']}" for n, d in rows_doc.items() if d["status"] != "ok"]
    method = METHOD.format(panels=args.panels, threads=threads, shots=len(ho.items), test_seed=TEST_DATA_SEED,
                           n_true=n_true, edges=f"{ho.edges[0]:.0f} / {ho.edges[1]:.0f} photons", reps=args.reps)
    print()
    print(common.format_table(headers, trows))
    for n in notes:
        print(n)
    md = ["# Architectures for Bragg-peak segmentation under equal compute budgets", "",
          f"Command: `{env['command']}`", "",
          f"Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, torch {env['versions']['torch']}, "
          f"{threads} threads, capability {env['cpu_capability']}, flags {' '.join(env['cpu_flags']) or '-'}", "",
          common.format_table(headers, trows, markdown=True), ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md += ["## Method", "", method, ""]
    (args.out / "architectures.md").write_text("\n".join(md))
    print(f"wrote {args.out / 'architectures.md'}")
    doc = {"environment": env, "args": {k: (v if isinstance(v, (int, float, list)) else str(v))
                                        for k, v in vars(args).items()},
           "budget_clock": f"process CPU time / {threads} torch threads over the training steps",
           "data": {"training_panels_per_seed": args.panels, "test_data_seed": TEST_DATA_SEED,
                    "held_out_shots": len(ho.items), "true_peaks": n_true, "photon_tertile_edges": list(ho.edges),
                    "data_config": data_cfg, "predict": OmegaConf.to_container(pk, resolve=True),
                    "module": _module_cfg(cfg)},
           "method": method, "rows": rows_doc, "summary": summary, "timing_run": timing_stats}
    common.write_json(args.out / "architectures.json", doc)
    if summary:
        plot(summary, args.budgets, args.out / "architectures.png")
    return doc


if __name__ == "__main__":
    main()
