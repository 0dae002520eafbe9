"""`chestxray datasets`: the dataset readers and their label mappings to the common vocabulary."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "datasets",
        help="list the dataset readers (NAME:PATH) and how each maps its labels to the common findings",
    )
    p.add_argument("name", nargs="?", default=None, help="show only this reader's table")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chestxray.data.datasets import READERS
    from chestxray.data.harmonise import DERIVED, MAPPINGS, VOCABULARY, mapping_rows
    from chestxray.errors import DatasetError

    names = [args.name] if args.name else [*READERS, "google2019"]
    for n in names:
        if n not in READERS and n not in MAPPINGS:
            raise DatasetError(f"unknown dataset {n!r}; known: {', '.join([*READERS, 'google2019'])}")
    if args.json:
        out = {
            "vocabulary": list(VOCABULARY),
            "derived": {k: list(v) for k, v in DERIVED.items()},
            "datasets": {
                n: {
                    "title": READERS[n].title
                    if n in READERS
                    else "Google 2019 expert labels for NIH (evaluate --labels)",
                    "layout": READERS[n].layout if n in READERS else "google2019_nih-chest-xray-labels.csv(.gz)",
                    "mapping": MAPPINGS.get(n),
                }
                for n in names
            },
        }
        print(json.dumps(out, indent=2))
        return 0
    if not args.name:  # the vocabulary once, above all the tables
        print("findings: " + ", ".join(VOCABULARY))
        for target, parts in DERIVED.items():
            print(f"derived for scoring: {target} = max({', '.join(parts)}) of a model's probabilities")
    for k, n in enumerate(names):
        reader = READERS.get(n)
        if k or not args.name:
            print()
        if reader is not None:
            print(f"{n}:PATH  {reader.title}\n  layout: {reader.layout}")
        else:
            print(f"{n}:FILE  Google 2019 expert labels for NIH (evaluate --labels google2019:FILE)")
        if n == "csv":
            print("  mapping: column names matched case-insensitively against every table below")
            continue
        for own, target in mapping_rows(n):
            print(f"  {own:<44} -> {target}")
    return 0
