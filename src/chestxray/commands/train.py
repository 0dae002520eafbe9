"""`chestxray train ROOT --out RUN`: the seed recipe by default, every part an option, options
also from a file (`--config run.yaml`, flags win), and `--recipe scratch` for random init."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from chestxray.commands._common import ROOT_HELP, add_dataset_args, add_device_arg, non_negative_int, positive_int
from chestxray.errors import ChestXrayError

if TYPE_CHECKING:
    from chestxray.training.config import TrainConfig

# Parsed with every default suppressed, so that `args` holds only the flags actually given and
# they can override a --config file; the real defaults are TrainConfig's (and the recipe's).


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier from a prepared cache (seed recipe by default)",
        description="Defaults are the seed recipe: ResNet-50 with ImageNet weights, layer2-layer4 and the "
        "head trained, BCEWithLogitsLoss, Adam at 1e-5, ReduceLROnPlateau on validation loss, "
        "5 epochs, the model's own input size (224 px). `--recipe scratch` trains from random weights "
        "(all layers, AdamW, one-cycle to 1e-3, weight decay 1e-4, strong augmentation, 30 epochs). "
        "Options may come from `--config FILE` (YAML or JSON, e.g. a run's config.yaml); flags given "
        "here override it. Run under `torchrun --nproc_per_node N` for multi-GPU (DDP).",
    )
    p.add_argument(
        "root",
        nargs="*",
        help=ROOT_HELP + "; several train on their union (each dataset's own split, frontal views by default); "
        "or `root:` in --config",
    )
    p.add_argument("--out", help="run folder: config.yaml, log.jsonl, curves.png, summary.md, model.safetensors")
    p.add_argument("--config", metavar="FILE", help="options from a YAML/JSON file or a run folder's config")
    p.add_argument("--recipe", choices=["seed", "scratch"], help="seed (default) or scratch: see above")
    p.add_argument(
        "--model", help="architecture: resnet50 (default), densenet121, resnet18, or timm/<name> (`chestxray models`)"
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--weights", help="'imagenet' (default; torchvision download), 'none' (random init) or a FILE")
    start.add_argument(
        "--init",
        metavar="BUNDLE",
        help="start from a bundle's weights (e.g. from `chestxray import xrv`); its architecture and "
        "preprocessing are kept (--image-size may change the size), output rows remapped by finding name",
    )
    p.add_argument(
        "--freeze",
        choices=["seed", "all", "head"],
        help="seed (default): train the last stages + head (ResNet layer2-4; DenseNet denseblock3-4, norm5); "
        "all: train everything; head: head only",
    )
    p.add_argument("--epochs", type=positive_int, help="default 5 (scratch: 30)")
    p.add_argument("--batch-size", type=positive_int, help="default 32")
    p.add_argument("--lr", type=float, help="learning rate (peak for onecycle; default 1e-5, scratch 1e-3)")
    p.add_argument("--weight-decay", type=float, help="default 0 (scratch 1e-4)")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], help="default adam (scratch adamw)")
    p.add_argument(
        "--schedule", choices=["plateau", "onecycle", "cosine", "none"], help="default plateau (scratch onecycle)"
    )
    p.add_argument("--plateau-patience", type=int, help="default 1")
    p.add_argument(
        "--image-size", type=positive_int, help="input size in px (default: the model's own, 224 for torchvision)"
    )
    p.add_argument(
        "--augment",
        choices=["none", "seed", "strong"],
        help="on-device augmentation: seed = rotation 10, h-flip, brightness/contrast; "
        "strong = rotation, scale, shift, contrast (default none; scratch strong)",
    )
    p.add_argument(
        "--pos-weight",
        choices=["none", "balanced"],
        help="positive-class weighting of the loss (balanced = negatives/positives, capped at 50; default none)",
    )
    p.add_argument("--seed", type=int, help="default 0")
    add_device_arg(p, default="auto")
    p.add_argument("--workers", type=int, help="processes for preparing a missing cache (default 2)")
    p.add_argument("--cache", help="prepared cache folder (default as in `chestxray prepare`)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-steps", type=positive_int, help="cap steps per epoch (smoke tests)")
    p.add_argument("--name", help="model name stored in the bundle")
    p.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        help="TensorBoard event files in RUN/tensorboard (default: on when tensorboard is installed)",
    )
    p.add_argument(
        "--log-every",
        type=non_negative_int,
        metavar="N",
        help="without a terminal, a progress line every N steps (default 50; 0: none)",
    )
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt (options from RUN)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument(
        "--labels",
        help="comma-separated findings the model predicts (names as in `chestxray datasets`; "
        "default: every finding the training data labels, NIH's 14 for NIH alone)",
    )
    p.add_argument(
        "--loader",
        choices=("auto", "ram", "memmap"),
        help="hold each split in RAM, or read batches from the cache memmap (auto: by split size and free memory)",
    )
    add_dataset_args(p)
    for action in p._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool, bool]:
    """The run's options (recipe < --config < flags given) and the resume / overwrite actions."""
    from chestxray.training.config import TrainConfig, option_hints, resolve_options, run_config_file

    given = vars(args)
    resume, overwrite = bool(given.get("resume")), bool(given.get("overwrite"))
    if resume and overwrite:
        raise ChestXrayError("--resume and --overwrite contradict each other; pass one")
    config = given.get("config")
    out = given.get("out")
    if config is None and resume and out is not None:
        # `train --out RUN --resume` alone: the run's own options.
        found = run_config_file(Path(out))
        config = str(found) if found else None
    # argparse's own entries (command, run, verbose) and the actions are not options.
    explicit = {k: v for k, v in given.items() if k in option_hints() and k != "out"}
    if "root" in explicit:  # one root, or several trained on their union
        roots = list(explicit.pop("root"))
        if roots:
            explicit["root"] = roots[0] if len(roots) == 1 else roots
    options = resolve_options(explicit, config)
    if out is not None:
        options["out"] = out
    for key, flag in (("root", "ROOT"), ("out", "--out")):
        if options.get(key) is None:
            raise ChestXrayError(f"no {flag} given (on the command line or in --config)")
    return TrainConfig(**options), resume, overwrite


def from_file_note(args: argparse.Namespace, cfg: TrainConfig) -> str | None:
    """The paths a --config file chose (resolved against its folder), said before the run starts."""
    given = vars(args)
    taken = [k for k in ("root", "out") if not given.get(k)]
    if not given.get("config") or not taken:
        return None
    return f"from --config {given['config']}: " + ", ".join(f"{k} {getattr(cfg, k)}" for k in taken)


def run(args: argparse.Namespace) -> int:
    import sys

    from chestxray.training.loop import train

    cfg, resume, overwrite = config_from_args(args)
    note = from_file_note(args, cfg)
    if note:
        print(note, file=sys.stderr, flush=True)
    bundle = train(cfg, resume=resume, overwrite=overwrite)
    if bundle is not None:
        print(f"bundle written: {bundle}; also {bundle.parent / 'curves.png'}, {bundle.parent / 'summary.md'}")
    return 0
