"""`chestxray info ROOT`: what a user checks first about a dataset root."""

from __future__ import annotations

import argparse
import json
from typing import Any

from chestxray.commands._common import ROOT_HELP, add_dataset_args, dataset_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="summarise a dataset root: images, patients, splits, views, label counts")
    p.add_argument("root", help=ROOT_HELP + " (metadata alone is enough)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_dataset_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray.data.datasets import open_dataset

    index = open_dataset(args.root, dataset_options(args, require_images=False, views=None))
    summary = index.summary()  # type: ignore[attr-defined]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary) if index.dataset == "nih" else format_table_summary(summary))
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
    lines += ["", _scored_line(s), _overlap_line(s["patient_overlap"])]
    return "\n".join(lines)


def _scored_line(s: dict[str, Any]) -> str:
    """How many labelled images `evaluate` scores: the test split by default, or all of them."""
    n = s["labelled"]
    return (
        f"evaluate        scores {n['test']:,} of {n['all']:,} labelled images (the test split); "
        f"--split all scores all {n['all']:,}"
    )


def _overlap_line(overlap: dict[str, int]) -> str:
    ok = not any(overlap.values())
    return (
        "patient overlap "
        + ", ".join(f"{k}: {v}" for k, v in overlap.items())
        + ("  OK" if ok else "  LEAK: patients on two sides")
    )


def format_table_summary(s: dict[str, Any]) -> str:
    """The human-readable form of `TableIndex.summary()` (every dataset but NIH)."""
    v = s["views"]
    missing = s["images_missing"]
    lines = [
        f"dataset         {s['dataset']}",
        f"root            {s['root']}",
        f"labels file     {s['labels_file']} ({s['label_rows']:,} rows, {s['rows']:,} images)",
        f"images          {s['images_found']:,} found, {missing:,} missing"
        + (f" (e.g. {', '.join(s['missing_examples'][:2])})" if missing else ""),
        f"patients        {s['patients']:,}" + (f", studies {s['studies']:,}" if s.get("studies") else ""),
        f"views           frontal {v['frontal']:,} (PA {v['PA']:,}, AP {v['AP']:,}), lateral {v['lateral']:,}, "
        f"view unknown {v['UNKNOWN']:,}",
        f"split           {s['split_source']}",
    ]
    lines += [f"note            {n}" for n in s["notes"]]
    lines += ["", f"{'split':<8}{'images':>10}{'found':>10}{'patients':>10}"]
    for name, sp in s["splits"].items():
        lines.append(f"{name:<8}{sp['images']:>10,}{sp['images_found']:>10,}{sp['patients']:>10,}")
    extra = any("blank_as_negative" in e for e in s["labels"].values())
    width = max([len(n) for n in s["labels"]] + [10]) + 2
    head = f"{'label':<{width}}{'positive':>10}{'negative':>10}{'uncertain':>10}{'unlabelled':>11}"
    lines += ["", head + (f"{'blank->neg':>11}" if extra else "")]
    for name, e in s["labels"].items():
        row = f"{name:<{width}}{e['positive']:>10,}{e['negative']:>10,}{e['uncertain']:>10,}{e['unlabelled']:>11,}"
        lines.append(row + (f"{e.get('blank_as_negative', 0):>11,}" if extra else ""))
    lines += ["", _scored_line(s), _overlap_line(s["patient_overlap"])]
    return "\n".join(lines)
