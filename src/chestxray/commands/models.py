"""`chestxray models`: the architectures the registry knows."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model architectures")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray.models.registry import registered_models

    for name, spec in sorted(registered_models().items()):
        pre = spec.preprocessing
        print(f"{name:<14} input {pre.size}px  seed-trainable {', '.join(spec.seed_trainable)} + {spec.head}")
    print(
        "timm/<name>    any timm model (pip install timm), e.g. timm/efficientnet_b0, timm/convnext_tiny; "
        "input size and normalisation from its own config"
    )
    return 0
