"""Fine-tune a Zoo classifier with Lightning.

    python examples/zoo_lightning.py                                    # tiny random model + random data (CI)
    python examples/zoo_lightning.py --model-type dinov2_reg_vit --pretrained --freeze-backbone

With ``--pretrained`` the registry's checkpoint is loaded through vitkit's cache (``--model-name`` takes an HF
id, a local directory or a vitkit preset instead); without it, the architecture is built with random weights
(shrunk to a tiny size unless ``--full-size``). Replace ``random_data`` with your own dataset of
(image [C, H, W] float, label) pairs, normalised as the weights expect.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import vitkit
from vitkit.zoo import ZooClassifier

TINY = dict(embed_dim=32, depth=2, num_heads=4)


def random_data(n: int, size: int, num_classes: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g))


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-type", default="dino_v2_vit", choices=vitkit.zoo.list_models())
    p.add_argument("--model-name", default=None, help="HF id, local directory or vitkit preset (overrides the key)")
    p.add_argument("--pretrained", action="store_true", help="load the checkpoint's weights")
    p.add_argument("--full-size", action="store_true", help="random weights at the checkpoint's real size")
    p.add_argument("--freeze-backbone", action="store_true")
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    args = p.parse_args(argv)

    config = {"img_size": args.image_size}
    if not (args.pretrained or args.full_size):
        config.update(TINY)
    model = vitkit.build_model(args.model_type, model_name=args.model_name, head=args.num_classes,
                               freeze_backbone=args.freeze_backbone, load_pretrained=args.pretrained,
                               config_kwargs=config)
    clf = ZooClassifier(model, lr=args.lr)
    train = DataLoader(random_data(16, args.image_size, args.num_classes), batch_size=8, shuffle=True)
    val = DataLoader(random_data(8, args.image_size, args.num_classes, seed=1), batch_size=8)
    trainer = L.Trainer(max_steps=args.max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, val_check_interval=min(args.max_steps, 2))
    trainer.fit(clf, train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return metrics


if __name__ == "__main__":
    main()
