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
    from vitkit.backbones.factory import create_backbone, from_pretrained
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
    return parser


def main(argv: list[str] | None = None) -> int:
    from vitkit.errors import VitkitError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (VitkitError, FileNotFoundError) as e:
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
