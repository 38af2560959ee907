"""Bragg-peak finding for X-ray crystallography (PeakNet): synthetic data, I/O, post-processing, metrics.

* :mod:`.synthetic` -- seeded synthetic diffraction frames with half-maximum labels and true peak lists
  (:class:`SynthConfig`, :func:`make_frame`, :func:`make_panel_stack`, :class:`SyntheticPeakDataset`).
* :mod:`.io` -- lazy readers for zarr / HDF5 / CXI / .npy / PNG / TIFF (:func:`open_frames`; the sources are in
  :mod:`.sources`) and atomic writers for zarr stores, CSV and overlay PNGs (:mod:`.writers`) and CXI peak lists
  for CrystFEL (:mod:`.cxi`, also the stream's ordered writer), all under one name.
* :mod:`.peakfind` -- mask -> peaks: vectorised connected components, intensity-weighted centroids and
  integrated intensities (:func:`find_peaks`, :func:`peaks_per_frame`, :func:`logits_to_mask`).
* :mod:`.detector`, :mod:`.geom` -- multi-panel detectors (CrystFEL ``.geom`` read and written, built-in
  epix10k2M, Jungfrau 4M, CSPAD layouts); :mod:`.lattice` -- lattice-still simulator.
* :mod:`.finder` -- :class:`PeakFinder`: events ``[P, H, W]`` in, typed peak tables out (the one inference path).
* :mod:`.metrics` -- one-to-one peak matching, peak precision/recall/F1/RMSE, pixel IoU/Dice.
* :mod:`.job` -- train / predict / evaluate; :mod:`.stream` -- streaming inference on Ray (``vitkit stream``).
"""

from vitkit.apps.peaks.io import (
    ConcatSource,
    CorruptFileError,
    DatasetKeyError,
    FramesNotFoundError,
    FrameSource,
    H5Source,
    ImageSource,
    LabelShapeError,
    NaNFrameError,
    NpySource,
    PeakIOError,
    UnsupportedFormatError,
    ZarrSource,
    open_frames,
    read_csv_peaks,
    read_cxi_peaks,
    read_frames,
    save_overlay_png,
    write_csv,
    write_cxi,
    write_zarr,
)
from vitkit.apps.peaks.metrics import match_peaks, peak_metrics, pixel_metrics
from vitkit.apps.peaks.peakfind import PEAK_DTYPE, find_peaks, label_components, logits_to_mask, peaks_per_frame
from vitkit.apps.peaks.synthetic import (
    SynthConfig,
    SyntheticPeakDataset,
    collate_peaks,
    make_frame,
    make_panel_stack,
)

__all__ = [
    "SynthConfig", "SyntheticPeakDataset", "collate_peaks", "make_frame", "make_panel_stack",
    "PEAK_DTYPE", "find_peaks", "peaks_per_frame", "label_components", "logits_to_mask",
    "match_peaks", "peak_metrics", "pixel_metrics",
    "open_frames", "read_frames", "write_zarr", "write_cxi", "read_cxi_peaks", "write_csv", "read_csv_peaks",
    "save_overlay_png", "FrameSource", "ZarrSource", "H5Source", "NpySource", "ImageSource", "ConcatSource",
    "PeakIOError", "DatasetKeyError", "CorruptFileError", "NaNFrameError", "LabelShapeError",
    "UnsupportedFormatError", "FramesNotFoundError",
]
