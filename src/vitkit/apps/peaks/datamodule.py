"""LightningDataModule for peak segmentation: synthetic frames or PeakNet-style files, cropped around
the beam centre (PeakNet's polar centre crop), instance-normalised, 1 channel end to end."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from vitkit.apps.peaks.peakfind import LONE_PIXEL_RATIO, lone_pixels
from vitkit.tasks.transforms import crop_at, pad_to, polar_center_crop_box, random_crop_box, robust_normalise


class EpochSeededSampler(DistributedSampler):
    """Shuffles with a generator seeded by (seed, epoch) and yields ``epoch * N + index``, so the dataset
    can seed its augmentation from the index too. With ``world > 1`` rank ``r`` takes every ``world``-th
    index of the shuffled order from ``r`` (the tail that does not divide is dropped). Being a
    ``DistributedSampler`` it is not wrapped by Lightning (whose wrapper would reshuffle by its own epoch).

    The epoch is the number of passes already served, kept in ``counter`` (the data module's state,
    saved in checkpoints), not Lightning's ``set_epoch`` value: that one is off by one after resuming
    from an end-of-epoch checkpoint, while this count makes a resumed run replay exactly.
    """

    def __init__(self, n: int, seed: int, counter: dict[str, int], shuffle: bool = True, rank: int = 0,
                 world: int = 1):
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.n, self.counter = n, counter

    def __len__(self) -> int:
        return self.n // self.num_replicas

    def set_epoch(self, epoch: int) -> None:  # Lightning's epoch is not used (see above)
        pass

    def __iter__(self) -> Iterator[int]:
        epoch = self.counter["epochs_served"]
        self.counter["epochs_served"] += 1
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = order[self.rank:len(self) * self.num_replicas:self.num_replicas]
        return iter(epoch * self.n + i for i in order)


class CropDataset(Dataset):
    """Wraps a frame or panel source: normalises the whole frame, pads to the crop, takes a crop.

    ``source[i]`` returns a dict with ``image`` ([H, W] or [1, H, W]) and ``label`` ([H, W]), optionally
    ``good`` ([H, W] bool, the bad-pixel mask: True = good), ``peaks`` ([n, 2+] ``(ss, fs, ...)``) and
    ``weak`` ([m, 2] ``(ss, fs)`` of real but weak reflections whose pixels, within ``weak_radius``, the loss
    ignores).
    The frame is normalised as inference normalises a panel (:func:`robust_normalise` over its good pixels,
    bad pixels 0) before it is cropped, so training crops see exactly what the model sees at inference.
    Crop placement: with ``sigma`` set, PeakNet's polar centre crop (single frames around the beam centre),
    except that with probability ``peak_bias`` the crop is centred on a random true peak (panels where peaks
    are sparse) and with probability ``negative_bias`` on a random *hard negative*: a valid background pixel
    brighter than ``negative_level`` in the normalised image (unmasked hot clusters, jet streaks, noise
    clusters: what a finder must learn to leave alone and a random crop rarely shows); ``sigma=None``
    (evaluation): a deterministic centre crop. Items are ``image`` [1, h, w]
    float32, ``label`` [h, w] int64 and ``valid`` [h, w] bool (False on bad pixels and padding: the loss
    ignores them).
    """

    def __init__(self, source, crop: tuple[int, int], sigma: float | None = 0.33, seed: int = 0,
                 peak_bias: float = 0.0, uniform: bool = False, weak_radius: float = 2.0, detector=None,
                 lone_pixel_ratio: float | None = None, negative_bias: float = 0.0, negative_level: float = 3.0):
        self.source, self.crop, self.sigma, self.seed = source, tuple(crop), sigma, seed
        self.negative_bias, self.negative_level = negative_bias, negative_level
        self.lone_pixel_ratio = lone_pixel_ratio
        self.peak_bias, self.uniform, self.weak_radius = peak_bias, uniform, weak_radius
        self.unit = None if detector is None else detector.photon_adu()  # as PeakFinder normalises

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        n = len(self.source)
        item = self.source[key % n]
        image = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)
        image = image[None] if image.ndim == 2 else image
        label = torch.as_tensor(np.asarray(item["label"]), dtype=torch.int64)
        good = item.get("good")
        valid = torch.ones(label.shape, dtype=torch.bool) if good is None else torch.as_tensor(np.asarray(good))
        unit = None if self.unit is None else float(self.unit[int(item.get("panel", 0))])
        if self.lone_pixel_ratio is not None:  # as PeakFinder: pixels bright on their own are bad pixels
            valid = valid & ~torch.from_numpy(lone_pixels(image[0].numpy(), valid.numpy(), self.lone_pixel_ratio,
                                                          unit))
        image = robust_normalise(image, valid[None], unit=unit)
        weak = item.get("weak")
        if weak is not None and len(weak):  # weak reflections: neither peak nor background for the loss
            valid = valid & ~torch.from_numpy(_disks(np.asarray(weak), label.shape, self.weak_radius))
        H, W = self.crop
        h, w = image.shape[-2:]
        image, label, valid = pad_to(image, H, W), pad_to(label, H, W), pad_to(valid, H, W, value=False)
        top, left = self.box(key, image, label, valid, item.get("peaks"), (h, w))
        return {"image": crop_at(image, top, left, H, W), "label": (crop_at(label, top, left, H, W) > 0).long(),
                "valid": crop_at(valid, top, left, H, W)}

    def box(self, key: int, image: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, peaks,
            unpadded: tuple[int, int]) -> tuple[int, int]:
        """Top-left corner of item ``key``'s crop in its padded, normalised ``image`` ``[1, hp, wp]`` (the
        placement rule of the class docstring; ``unpadded`` is the frame's size before padding)."""
        H, W = self.crop
        hp, wp = image.shape[-2:]
        if self.sigma is None:  # evaluation: deterministic centre crop
            return (hp - H) // 2, (wp - W) // 2
        g = torch.Generator().manual_seed(self.seed * 7_368_787 + key)
        u = float(torch.rand(1, generator=g))
        centre = None
        if peaks is not None and len(peaks) and u < self.peak_bias:
            j = int(torch.randint(0, len(peaks), (1,), generator=g))
            centre = tuple(float(v) for v in np.asarray(peaks)[j, :2])
        elif u >= 1.0 - self.negative_bias:
            neg = torch.nonzero((image[0] > self.negative_level) & valid & (label == 0))
            if len(neg):
                centre = tuple(float(v) for v in neg[int(torch.randint(0, len(neg), (1,), generator=g))])
        if centre is not None:
            cy, cx = centre
            jy, jx = (torch.rand(2, generator=g) - 0.5).tolist()  # the centre anywhere in the middle half
            return (int(round(min(max(cy - H / 2 + jy * H / 2, 0), hp - H))),
                    int(round(min(max(cx - W / 2 + jx * W / 2, 0), wp - W))))
        if self.uniform:
            return random_crop_box(hp, wp, H, W, g)
        return polar_center_crop_box(unpadded[0], unpadded[1], H, W, self.sigma, g)


def _disks(centres: np.ndarray, shape: tuple[int, int], radius: float) -> np.ndarray:
    """Bool ``[H, W]``: True within ``radius`` px of any ``(y, x)`` centre."""
    out = np.zeros(shape, dtype=bool)
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    keep = dy ** 2 + dx ** 2 <= radius ** 2
    dy, dx = dy[keep], dx[keep]
    c = np.rint(centres[:, :2]).astype(np.int64)
    y, x = (c[:, :1] + dy).ravel(), (c[:, 1:] + dx).ravel()
    ok = (y >= 0) & (y < shape[0]) & (x >= 0) & (x < shape[1])
    out[y[ok], x[ok]] = True
    return out


class PeakDataModule(L.LightningDataModule):
    """Train / validation / held-out test data for peak segmentation.

    Args:
        source: ``"lattice"`` (simulated lattice stills on a detector, :mod:`.lattice`: training and validation
            items are panels, held-out items whole shots), ``"synthetic"`` (single frames of random peaks,
            :mod:`.synthetic`) or ``"files"`` (``train``/``val``/``test`` paths, globs or CSV lists of zarr
            stores with labels).
        detector: for ``lattice``: a built-in name or ``.geom`` path (the run keeps it as ``detector.geom``).
        frame_shape: synthetic frame size; crop: training crop (= the model's img_size).
        polar_crop_sigma: spread of the crop centre around the beam centre (PeakNet); None = centre crop.
        peak_bias: probability that a training crop is centred on a random true peak (lattice panels).
        negative_bias: probability that a training crop is centred on a random hard negative (a bright valid
            background pixel, :class:`CropDataset`).
        num_train, num_val, num_test: split sizes (panels / panels / shots for ``lattice``; disjoint seeds).
        num_calib: calibration shots (whole shots, a seed of their own) for fitting the sparse-token threshold
            (``frames("calib")``); ``files`` calibrates on the validation files.
        lattice, synth: overrides of :class:`~.lattice.LatticeConfig` / :class:`~.synthetic.SynthConfig`.
    """

    def __init__(self, source: str = "synthetic", frame_shape: tuple[int, int] = (128, 128),
                 crop: tuple[int, int] = (64, 64), polar_crop_sigma: float | None = 0.33, num_train: int = 512,
                 num_val: int = 16, num_test: int = 16, num_calib: int = 8, seed: int = 0, batch_size: int = 8,
                 num_workers: int = 0,
                 train: str | None = None, val: str | None = None, test: str | None = None, key: str | None = None,
                 synth: dict[str, Any] | None = None, detector: str | None = None, peak_bias: float = 0.0,
                 lattice: dict[str, Any] | None = None, negative_bias: float = 0.0):
        super().__init__()
        if source not in ("lattice", "synthetic", "files"):
            raise ValueError(f"data.source must be 'lattice', 'synthetic' or 'files', got {source!r}")
        if source == "files" and not train:
            raise ValueError("data.source=files needs data.train (a path, glob or CSV of zarr stores)")
        self.detector = None
        if source == "lattice":
            from vitkit.apps.peaks.detector import load_detector

            self.detector = load_detector(detector or "epix10k2m")
            adu = (lattice or {}).get("adu_per_photon")
            if adu is not None:  # the simulated ADU scale is the run's detector's (PeakFinder normalises by it)
                self.detector = self.detector.replace(adu_per_photon=float(adu),
                                                      panels=[p.replace(adu_per_photon=None) for p in
                                                              self.detector.panels])
        self.kw = dict(source=source, frame_shape=tuple(frame_shape), crop=tuple(crop), sigma=polar_crop_sigma,
                       num_train=num_train, num_val=num_val, num_test=num_test, num_calib=num_calib, seed=seed,
                       train=train, val=val, test=test, key=key, synth=dict(synth or {}), detector=self.detector,
                       lattice=dict(lattice or {}))
        self.peak_bias, self.negative_bias = peak_bias, negative_bias
        self.batch_size, self.num_workers = batch_size, num_workers
        self.sources: dict[str, Any] = {}
        self.progress = {"epochs_served": 0}

    def state_dict(self) -> dict[str, int]:  # stored in Lightning checkpoints
        return dict(self.progress)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.progress.update(state)

    def frames(self, split: str):
        """The raw frame source of a split (``train``, ``val``, ``test``, ``calib``; None when it has none)."""
        if split not in self.sources:
            self.sources[split] = make_source(split, **self.kw)
        return self.sources[split]

    def setup(self, stage: str | None = None) -> None:
        crop, seed = self.kw["crop"], self.kw["seed"]
        panels = self.kw["source"] == "lattice"  # panels: crops anywhere (no beam centre), biased to peaks
        det = self.detector
        lone = LONE_PIXEL_RATIO  # PeakFinder's default rule: the model never sees a lone hot pixel
        self.train_set = CropDataset(self.frames("train"), crop, self.kw["sigma"], seed, self.peak_bias, panels,
                                     detector=det, lone_pixel_ratio=lone, negative_bias=self.negative_bias)
        val = self.frames("val")
        self.val_set = None
        if val is not None:  # deterministic crops (seeded by index); panels keep the training placement rule
            self.val_set = CropDataset(val, crop, self.kw["sigma"] if panels else None, seed + 1, self.peak_bias,
                                       panels, detector=det, lone_pixel_ratio=lone, negative_bias=self.negative_bias)

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = EpochSeededSampler(len(self.train_set), self.kw["seed"], self.progress, rank=rank, world=world)
        # own generators: creating loader iterators must not draw from the global RNG, whose state the
        # checkpoints carry (else a validation run between checkpoint and next epoch breaks exact resume)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=True, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.kw["seed"]))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.kw["seed"]))


class LabelledFrames:
    """A file :class:`~vitkit.apps.peaks.io.FrameSource` seen as items ``{"image", "label"}``."""

    def __init__(self, frames):
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.frames.read(i)
        return {"image": image, "label": label}


def make_source(split: str, source: str, num_train: int, num_val: int, num_test: int, seed: int, frame_shape=None,
                train=None, val=None, test=None, key=None, synth=None, detector=None, lattice=None,
                num_calib: int = 8, **_):
    """Data of one split (``train``, ``val``, ``test``, ``calib``): simulated (disjoint seeds per split) or from
    files (``calib``: the validation files)."""
    n = {"train": num_train, "val": num_val, "test": num_test, "calib": num_calib}[split]
    offset = {"train": 0, "val": 1, "test": 2, "calib": 3}[split]
    if source == "lattice":
        from vitkit.apps.peaks.lattice import LatticeConfig, LatticeStillsDataset

        if n == 0:
            return None
        cfg = LatticeConfig(**(lattice or {}))
        # held out and calibration: whole shots, every panel; training and validation: one panel of a fresh shot
        return LatticeStillsDataset(n, detector, cfg, seed=seed * 10 + offset,
                                    panels_per_item=None if split in ("test", "calib") else 1)
    if source == "synthetic":
        from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset

        if n == 0:
            return None
        cfg = SynthConfig(shape=tuple(frame_shape), **(synth or {}))
        return SyntheticPeakDataset(n, seed=seed * 10 + offset, cfg=cfg)
    from vitkit.apps.peaks.io import open_frames

    path = {"train": train, "val": val, "test": test, "calib": val}[split]
    if path is None:
        return None
    frames = open_frames(path, key=key)
    if not frames.has_labels:
        raise ValueError(f"data.{split}={path!r} has no labels; training and evaluation need labelled frames "
                         f"(zarr 'labels' dataset)")
    return LabelledFrames(frames)
