"""`chestxray train ROOT --out RUN`: the seed recipe by default, every part an option."""

from __future__ import annotations

import argparse

from chestxray.commands._common import ROOT_HELP, add_dataset_args, add_device_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier from a prepared cache (seed recipe by default)",
        description="Defaults are the seed recipe: ResNet-50 with ImageNet weights, layer2-layer4 and the "
        "head trained, BCEWithLogitsLoss, Adam at 1e-5, ReduceLROnPlateau on validation loss, "
        "5 epochs, 224 px. Run under `torchrun --nproc_per_node N` for multi-GPU (DDP).",
    )
    p.add_argument(
        "root",
        nargs="+",
        help=ROOT_HELP + "; several train on their union (each dataset's own split, frontal views by default)",
    )
    p.add_argument("--out", required=True, help="run folder: log.jsonl, checkpoint.pt, model.safetensors")
    p.add_argument(
        "--model",
        default="resnet50",
        help="architecture: resnet50, densenet121, resnet18, or timm/<name> (see `chestxray models`)",
    )
    p.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (torchvision download), 'none' (random init) or a state-dict FILE",
    )
    p.add_argument(
        "--freeze",
        default="seed",
        choices=["seed", "all", "head"],
        help="seed: train layer2-layer4 + head; all: train everything; head: head only (default seed)",
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (peak for onecycle)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    p.add_argument("--schedule", default="plateau", choices=["plateau", "onecycle", "cosine", "none"])
    p.add_argument("--plateau-patience", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--augment",
        default="none",
        choices=["none", "seed", "strong"],
        help="on-device augmentation: seed = rotation 10, h-flip, brightness/contrast; "
        "strong = rotation, scale, shift, contrast (default none)",
    )
    p.add_argument(
        "--pos-weight",
        default="none",
        choices=["none", "balanced"],
        help="positive-class weighting of the loss (balanced = negatives/positives, capped at 50)",
    )
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p, default="auto")
    p.add_argument("--workers", type=int, default=2, help="processes for preparing a missing cache")
    p.add_argument("--cache", default=None, help="prepared cache folder (default as in `chestxray prepare`)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke tests)")
    p.add_argument("--name", default=None, help="model name stored in the bundle")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument(
        "--labels",
        default=None,
        help="comma-separated findings the model predicts (names as in `chestxray datasets`; "
        "default: every finding the training data labels, NIH's 14 for NIH alone)",
    )
    p.add_argument(
        "--loader",
        choices=("auto", "ram", "memmap"),
        default="auto",
        help="hold each split in RAM, or read batches from the cache memmap (auto: by split size and free memory)",
    )
    add_dataset_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray.training.loop import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["root"] = args.root[0] if len(args.root) == 1 else list(args.root)
    cfg = TrainConfig(**values)
    bundle = train(cfg, resume=args.resume)
    if bundle is not None:
        print(f"bundle written: {bundle}")
    return 0
