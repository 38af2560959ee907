"""The ``vitkit`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from vitkit.backbones import PRESETS, VisionTransformer, ViTConfig

    names = args.names or sorted(PRESETS)
    rows = []
    for name in names:
        if name not in PRESETS:
            from vitkit.backbones.presets import get_preset

            get_preset(name)  # raises with suggestions
        p = PRESETS[name]
        cfg = ViTConfig(**p.config)
        with torch.device("meta"):  # count parameters without allocating them
            n = VisionTransformer(cfg).num_params()
        ffn = f"{cfg.ffn_layer}({cfg.ffn_hidden_dim})"
        extras = []
        if cfg.num_register_tokens:
            extras.append(f"reg={cfg.num_register_tokens}")
        if cfg.rope:
            extras.append("rope")
        if not cfg.class_token:
            extras.append("no-cls")
        if cfg.dist_token:
            extras.append("dist")
        rows.append((name, cfg.family, f"{cfg.patch_size}", f"{cfg.img_size[0]}", f"{cfg.embed_dim}",
                     f"{cfg.depth}", f"{cfg.num_heads}", ffn, ",".join(extras) or "-", _fmt_params(n),
                     p.published_params or "-", p.hf_id or "-"))
        if args.verbose:
            print(f"{name}: {cfg.to_dict()}")
    header = ("name", "family", "patch", "img", "dim", "depth", "heads", "ffn", "tokens", "params", "published",
              "weights (HF id)")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from vitkit.api import from_pretrained
    from vitkit.backbones.factory import create_backbone
    from vitkit.weights import save_pretrained

    src = Path(args.src)
    overrides = {}
    if args.img_size:
        overrides["img_size"] = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    if args.name:
        model = create_backbone(args.name, pretrained=src, in_chans=args.in_chans, **overrides)
    else:
        if args.in_chans != 3:
            overrides["in_chans"] = args.in_chans
        model = from_pretrained(src, **overrides)
    out = save_pretrained(model, args.dst)
    c = model.config
    print(f"converted {src} -> {out} (family {c.family}, embed_dim {c.embed_dim}, depth {c.depth}, "
          f"img_size {c.img_size}, {_fmt_params(model.num_params())} parameters)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lightning.pytorch.utilities import rank_zero_only

    from vitkit.apps.peaks.job import compose, train

    run_dir = train(compose(args.overrides))
    if rank_zero_only.rank == 0:  # distributed runs: one line from rank 0
        print(run_dir)  # the last line is the run directory
    return 0


def _open_inputs(args: argparse.Namespace, finder) -> object:
    """The events to predict: files opened lazily, read through the detector geometry when there is one.

    Without ``--geometry`` the run's ``detector.geom`` is used when the files fit it; files of single frames
    that do not fit it are read as one-panel events (the old single-frame use)."""
    from vitkit.apps.peaks.detector import DetectorShapeError
    from vitkit.apps.peaks.finder import EventSource
    from vitkit.apps.peaks.io import UnsupportedFormatError, open_frames

    frames = open_frames(args.inputs if len(args.inputs) > 1 else args.inputs[0], key=args.key)
    if finder.detector is None:
        if frames.frame_shape is not None and len(frames.frame_shape) != 2:
            raise UnsupportedFormatError(f"{frames.path}: frames of shape {frames.frame_shape} are panel stacks; "
                                         "pass --geometry FILE.geom (or a built-in name, e.g. epix10k2m).")
        return frames
    try:
        return EventSource(frames, finder.detector, finder.good)
    except DetectorShapeError:
        if args.geometry or args.mask or (frames.frame_shape is not None and len(frames.frame_shape) != 2):
            raise
        finder.detector = finder.good = None  # the run's detector does not describe these single frames
        return frames


def _finder(args: argparse.Namespace):
    from vitkit.apps.peaks.finder import PeakFinder, choose_sparse

    kw = dict(overlap=args.overlap)
    if args.threshold is not None:
        kw["threshold"] = args.threshold
    if args.min_snr is not None:
        kw["min_snr"] = args.min_snr if args.min_snr > 0 else None
    if args.command == "predict":
        kw.update(min_peaks=args.min_peaks, max_peaks=args.max_peaks)
        if args.min_pixels is not None:
            kw["min_pixels"] = args.min_pixels
    sparse, why = choose_sparse(args.checkpoint, args.sparse)
    print(f"model: {why}")
    finder = PeakFinder.from_run(args.checkpoint, geometry=args.geometry, bf16=args.bf16, sparse=sparse, **kw)
    if args.mask:
        if finder.detector is None:
            from vitkit.errors import InputError

            raise InputError(f"--mask {args.mask} needs a detector geometry: pass --geometry (the run has none).")
        from vitkit.apps.peaks.finder import read_mask

        good = read_mask(args.mask, finder.detector, args.mask_key, _bits(args.mask_good), _bits(args.mask_bad))
        finder.good = good if finder.good is None else finder.good & good
    elif finder.detector is not None and finder.detector.mask_file and args.geometry:
        from vitkit.apps.peaks.finder import read_mask

        mask_file = Path(finder.detector.mask_file)
        if not mask_file.is_absolute():
            mask_file = Path(args.geometry).parent / mask_file
        finder.good &= read_mask(mask_file, finder.detector, finder.detector.mask, _bits(args.mask_good),
                                 _bits(args.mask_bad))
    return finder


def _bits(v: str | None) -> int | None:
    return None if v is None else int(v, 0)


def cmd_predict(args: argparse.Namespace) -> int:
    from vitkit.apps.peaks.job import predict

    finder = _finder(args)
    events = _open_inputs(args, finder)
    out = Path(args.out)
    res = predict(finder, events, out, overlays=args.overlays, write_frames=args.write_frames)
    n = sum(len(p) for p in res["peaks"])
    print(f"{len(res['peaks'])} events, {n} peaks -> {out / 'peaks.cxi'}, {out / 'peaks.csv'}")
    if args.dials:
        from vitkit.apps.peaks import dials

        if finder.detector is None:
            from vitkit.errors import InputError

            raise InputError("--dials needs a detector geometry (--geometry, or a run with detector.geom).")
        dials.write_experiments(finder.detector, out / "imported.expt", n_images=len(res["peaks"]))
        dials.write_reflections(finder.detector, res["peaks"], out / "strong.refl")
        print(f"DIALS: {out / 'imported.expt'}, {out / 'strong.refl'} (e.g. dials.ssx_index imported.expt "
              f"strong.refl unit_cell=... space_group=...)")
    print(out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from vitkit.apps.peaks.datamodule import make_source
    from vitkit.apps.peaks.job import evaluate, format_metrics, predict, truth_of
    from vitkit.atomic import write_json

    finder = _finder(args)
    if args.inputs:
        events = _open_inputs(args, finder)
    else:  # the held-out data of the run
        run = Path(args.checkpoint)
        run = run if run.is_dir() else run.parent.parent
        cfg = OmegaConf.load(run / "config.yaml")
        data = OmegaConf.to_container(cfg.data, resolve=True)
        if data.get("source") == "lattice":
            data["detector"] = finder.detector
        events = make_source("test", **{k: v for k, v in data.items() if k not in ("crop", "polar_crop_sigma")})
    true_masks, true_peaks, weak = truth_of(events)
    out = Path(args.out)
    res = predict(finder, events, out, overlays=0, keep_masks=True)
    metrics = evaluate(res["masks"], res["peaks"], true_masks, true_peaks, radius=args.radius, weak=weak)
    metrics.update(model="sparse" if finder.sparse else "dense", num_frames=len(events))
    if finder.sparse:
        metrics["kept_token_fraction"] = finder.kept_token_fraction
    write_json(out / "metrics.json", metrics)
    print(format_metrics(metrics))
    print(out / "metrics.json")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    import numpy as np

    from vitkit.apps.peaks.io import write_zarr
    from vitkit.apps.peaks.synthetic import SynthConfig, SyntheticPeakDataset

    ds = SyntheticPeakDataset(args.n, cfg=SynthConfig(shape=tuple(args.shape)), seed=args.seed)
    items = [ds[i] for i in range(len(ds))]
    images = np.stack([it["image"].numpy().reshape(args.shape) for it in items]).astype(np.float32)
    labels = np.stack([it["label"].numpy() for it in items]).astype(np.int64)
    peaks = [it["peaks"].numpy().tolist() for it in items]
    write_zarr(args.out, images, labels, metadata=[{"peaks": p} for p in peaks])
    print(f"wrote {args.n} frames of {tuple(args.shape)} to {args.out}")
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from vitkit.apps.peaks.stream.config import load_stream_config

    cfg = load_stream_config(args.config, args.overrides)  # config errors do not need Ray
    from vitkit.apps.peaks.stream.ray import run_stream

    s = run_stream(cfg)
    lat = s["latency_s"]
    ob = s["object_store_bytes"]
    print(f"{s['frames_written']} frames, {s['peaks']} peaks, {s['frames_per_s']:.2f} frames/s, latency p50 "
          f"{(lat['p50'] or 0):.3f} s p95 {(lat['p95'] or 0):.3f} s, {s['actor_restarts']} actor restarts, "
          f"{len(s['rerun_batches'])} re-run batches, {s['events_dropped']} events dropped, "
          f"{s['messages_malformed']} malformed messages, {ob['results_per_frame']:.0f} result bytes/frame "
          f"-> {s['output']}, {s['stats_file']}")
    if args.report:
        print("stage      busy s  workers  utilisation")
        for name, st in s["stages"].items():
            print(f"{name:<9} {st['busy_s']:7.2f} {st['workers']:8g} {100 * st['utilisation']:11.0f} %")
        if s["source"].get("wait_s") is not None:
            print(f"(waiting for the source: {s['source']['wait_s']:.2f} s of {s['elapsed_s']:.2f} s)")
        print(f"limiting stage: {s['limiting_stage']['stage']}: {s['limiting_stage']['why']}")
    print(Path(s["output"]).parent)
    return 0


def cmd_stream_producer(args: argparse.Namespace) -> int:
    from vitkit.apps.peaks.stream.producer import producer_main

    return producer_main(args.args)


def cmd_detector(args: argparse.Namespace) -> int:
    from vitkit.apps.peaks.detector import load_detector
    from vitkit.apps.peaks.geom import detector_table, write_geom

    det = load_detector(args.detector)
    print(detector_table(det))
    if args.write_geom:
        print(f"wrote {write_geom(det, args.write_geom, layout=args.layout)} ({args.layout} layout)")
    if args.out:
        from vitkit.apps.peaks.draw import draw_detector

        print(f"wrote {draw_detector(det, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="list registered models with their configuration and parameter count")
    p.add_argument("names", nargs="*", help="only these models")
    p.add_argument("-v", "--verbose", action="store_true", help="print the full configuration of each model")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert any supported checkpoint into vitkit safetensors + config.json")
    p.add_argument("src", help="checkpoint file (.pth/.safetensors/.bin) or Hugging Face directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--name", help="registered model name (e.g. dinov2_vitl14_reg); inferred when omitted")
    p.add_argument("--img-size", type=int, nargs="+", help="resize position embeddings to H [W]")
    p.add_argument("--in-chans", type=int, default=3, help="input channels (1 folds RGB weights by summing)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train EoMT peak segmentation (default: synthetic frames), then predict "
                                     "and evaluate the held-out frames; prints the run directory last")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_steps=2000 model=eomt_vits16")
    p.set_defaults(func=cmd_train)

    for name, helptext in (("predict", "find peaks in frames: writes peaks.cxi, peaks.csv, overlay PNGs"),
                           ("evaluate", "pixel IoU/Dice and peak precision/recall/F1 against labels")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="run directory, .ckpt file or exported model directory")
        p.add_argument("inputs", nargs="*" if name == "evaluate" else "+",
                       help="zarr / HDF5 / CXI / .npy / PNG / TIFF files, globs or a CSV list"
                       + (" (default: the run's held-out synthetic frames)" if name == "evaluate" else ""))
        p.add_argument("--out", default="predictions" if name == "predict" else "evaluation")
        p.add_argument("--key", help="HDF5 dataset (default /entry_1/data_1/data) or zarr array of the frames")
        p.add_argument("--geometry", help="detector: a CrystFEL .geom file or a built-in layout (epix10k2m, "
                                          "jungfrau4m, cspad, single:HxW); default: the run's detector.geom")
        p.add_argument("--mask", help="bad-pixel mask (.npy / HDF5 / zarr; stack [P, H, W] or slab [SS, FS]); "
                                      "default: non-zero = good (psana), or the --mask-good/--mask-bad bits")
        p.add_argument("--mask-key", help="dataset/array of the mask in an HDF5 file or zarr store")
        p.add_argument("--mask-good", help="CrystFEL mask_good bits: good pixels have all of them set (e.g. 0x1)")
        p.add_argument("--mask-bad", help="CrystFEL mask_bad bits: pixels with any of them set are bad (e.g. 0xffff "
                                          "for 0 = good)")
        p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap")
        p.add_argument("--threshold", type=float, help="peak-class share of a peak core pixel (default 0.6)")
        p.add_argument("--min-snr", type=float, help="smallest photometric SNR of a peak against its local "
                                                     "background and along lines through it (default 5.5; 0: "
                                                     "no test)")
        which = p.add_mutually_exclusive_group()
        which.add_argument("--sparse", dest="sparse", action="store_const", const=True, default=None,
                           help="sparse-token inference: only patch tokens with a bright spot go through the model, "
                                "the run's sparse-token model (sparse_model/, sparse.json). Default: used when `vitkit "
                                "train` found it held the accuracy on the run's held-out shots (peak F1 within "
                                "sparse.max_f1_drop of the dense model's; sparse.json: held_out)")
        which.add_argument("--dense", dest="sparse", action="store_const", const=False,
                           help="the run's dense model (every patch token), even where --sparse is the default")
        p.add_argument("--bf16", action="store_true", help="model weights in bfloat16, cast once (as vitkit stream's "
                       "model.bf16): faster on CPUs with AVX512-BF16 or AMX and on GPUs, slower on CPUs without; "
                       "masks differ slightly from fp32")
        if name == "predict":
            p.add_argument("--min-peaks", type=int, default=0, help="frames with fewer peaks report none")
            p.add_argument("--max-peaks", type=int, default=2048, help="keep at most this many (brightest)")
            p.add_argument("--min-pixels", type=int, help="smallest peak (pixels; default 1)")
            p.add_argument("--overlays", type=int, default=4, help="overlay PNGs to write")
            p.add_argument("--write-frames", action="store_true", help="also store the frames in the CXI")
            p.add_argument("--dials", action="store_true", help="also write DIALS' imported.expt (the detector and "
                                                                "beam, one still per event) and strong.refl")
            p.set_defaults(func=cmd_predict)
        else:
            p.add_argument("--radius", type=float, default=2.0, help="peak matching radius in pixels")
            p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("stream", help="streaming peak finding on Ray (source -> model actors -> peak tasks -> CXI); "
                                      "reports frames/s, latency and queue depths; prints the output folder last")
    p.add_argument("config", help="packaged stream config name (default) or a YAML file")
    p.add_argument("overrides", nargs="*", help="overrides, e.g. model.checkpoint=runs/x source.kind=files "
                                                "source.path=data.zarr model.num_actors=2")
    p.add_argument("--report", action="store_true", help="print each stage's busy time and utilisation and say "
                                                         "which stage limits throughput")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("stream-producer", add_help=False,
                       help="send simulated or recorded detector events over a ZeroMQ socket at a set rate "
                            "(a test producer for `vitkit stream source.kind=zmq`; --help for its options)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_stream_producer)

    p = sub.add_parser("synth", help="write synthetic diffraction frames (zarr, PeakNet layout)")
    p.add_argument("out", help="output .zarr store")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--shape", type=int, nargs=2, default=[256, 256])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("detector", help="summarise a detector geometry (CrystFEL .geom file or built-in name), draw "
                                        "its layout, write it as .geom")
    p.add_argument("detector", help="a .geom file or a built-in: epix10k2m, jungfrau4m, cspad, single[:HxW]")
    p.add_argument("--out", help="draw the layout in the lab frame to this PNG")
    p.add_argument("--write-geom", help="write the geometry as a CrystFEL .geom file")
    p.add_argument("--layout", choices=("slab", "stack"), default="slab",
                   help="data layout of --write-geom: slab [SS, FS] (dim1 = ss) or panel stack [P, H, W] "
                        "(per-panel dim1 = index)")
    p.set_defaults(func=cmd_detector)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vitkit.errors import VitkitError

    args = build_parser().parse_args(argv)
    from vitkit.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # a vitkit process: reuse freed activations instead of page-faulting them in again
    try:
        return args.func(args)
    except (VitkitError, FileNotFoundError) as e:
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
