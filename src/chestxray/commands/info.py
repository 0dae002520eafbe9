"""`chestxray info ROOT`: what a user checks first about a dataset root."""

from __future__ import annotations

import argparse
import json
from typing import Any

from chestxray.commands._common import add_dataset_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="summarise an NIH ChestX-ray14 root: images, patients, splits, prevalence")
    p.add_argument("root", help="dataset root (labels CSV, split lists, images anywhere below)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_dataset_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray.data.index import load_nih

    index = load_nih(
        args.root,
        val_fraction=args.val_fraction,
        seed=args.split_seed,
        allow_missing=args.allow_missing,
        require_images=False,
    )
    summary = index.summary()
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    # A patient on two sides of a split is a leak: fail, so scripts and CI notice.
    return 1 if any(summary["patient_overlap"].values()) else 0


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable form of `NIHIndex.summary()`."""
    missing = s["images_missing"]
    lines = [
        f"root            {s['root']}",
        f"labels file     {s['labels_file']} ({s['label_rows']:,} rows"
        + (f", {s['unlisted_rows']:,} in neither split list" if s.get("unlisted_rows") else "")
        + ")",
        f"images          {s['images_found']:,} found, {missing:,} missing"
        + (f" (e.g. {', '.join(s['missing_examples'][:3])})" if missing else ""),
        f"patients        {s['patients']:,}",
        f"official split  train_val {s['official']['train_val']:,} / test {s['official']['test']:,} images",
        f"validation      {s['validation']['fraction']:.0%} of train_val patients, seed {s['validation']['seed']}",
        "",
        f"{'split':<8}{'images':>10}{'found':>10}{'patients':>10}{'no finding':>12}",
    ]
    for name, sp in s["splits"].items():
        lines.append(
            f"{name:<8}{sp['images']:>10,}{sp['images_found']:>10,}{sp['patients']:>10,}{sp['no_finding']:>12.1%}"
        )
    width = 20
    lines += ["", f"{'prevalence':<{width}}" + "".join(f"{n:>9}" for n in s["splits"])]
    findings = next(iter(s["splits"].values()))["prevalence"].keys()
    for f in findings:
        lines.append(f"  {f:<{width - 2}}" + "".join(f"{sp['prevalence'][f]:>9.2%}" for sp in s["splits"].values()))
    overlap = s["patient_overlap"]
    ok = not any(overlap.values())
    lines += [
        "",
        "patient overlap "
        + ", ".join(f"{k}: {v}" for k, v in overlap.items())
        + ("  OK" if ok else "  LEAK: patients on two sides"),
    ]
    return "\n".join(lines)
