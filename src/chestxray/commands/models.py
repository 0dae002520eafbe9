"""`chestxray models`: the architectures the registry knows."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model architectures")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray.models.registry import registered_models

    models = sorted(registered_models().items())
    timm = "timm/<name>"
    width = max(len(n) for n in [timm, *(name for name, _ in models)]) + 2  # one column for every name
    for name, spec in models:
        pre = spec.preprocessing
        print(f"{name:<{width}}input {pre.size}px  seed-trainable {', '.join(spec.seed_trainable)} + {spec.head}")
    print(
        f"{timm:<{width}}any timm model (pip install timm), e.g. timm/efficientnet_b0, timm/convnext_tiny; "
        "input size and normalisation from its own config"
    )
    return 0
