"""`csv`: any user's spreadsheet of labelled images.

A CSV with a path column (relative to the CSV's folder, or absolute; inside the dataset's
folder unless `allow_outside_root`, as is the spec's labels file) and either one column
per finding (1 positive, 0 negative, -1 uncertain, blank unknown) or one column of
`|`-separated findings ("No Finding" or an empty list of findings = all negative). Optional
columns: patient, study, split (train / val / test), view, sex, age. Column names are found
by common spellings, given by flags (`--csv-columns path=file,labels=findings`) or in a JSON
(or YAML) spec: `ROOT/dataset.json`, or `--csv-spec FILE`, e.g. {"file": "labels.csv", "path": "file", "labels": "findings", "patient": "pid"}
or {"path": "file", "findings": ["Effusion", "Nodule"]}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.data.common import (
    DatasetOptions,
    TableIndex,
    apply_uncertain,
    finish_index,
    frontal_from_view,
    normalise_sex,
    normalise_view,
    read_csv,
    to_age,
)
from chestxray.data.datasets.carve import carve_splits
from chestxray.errors import DatasetError

# Spellings tried when the spec does not name a column (first match, case-insensitive).
GUESSES = {
    "path": ("path", "image", "file", "filename", "image_path", "Image Index"),
    "labels": ("labels", "findings", "Finding Labels", "finding_labels"),
    "patient": ("patient", "patient_id", "Patient ID", "subject_id"),
    "study": ("study", "study_id"),
    "split": ("split", "set", "fold"),
    "view": ("view", "View Position", "ViewPosition", "projection"),
    "sex": ("sex", "gender", "Patient Gender"),
    "age": ("age", "Patient Age"),
}
SPEC_KEYS = {"file", "findings", "separator", *GUESSES}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test"}
SPEC_FILES = ("dataset.json", "dataset.yaml", "dataset.yml")


def load_spec(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the csv spec ({exc.strerror or exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise DatasetError(f"{path}: YAML specs need PyYAML (pip install pyyaml); or write it as JSON") from None
        from chestxray.io import load_yaml

        try:
            spec = load_yaml(text)
        except ValueError as exc:  # an alias: refused
            raise DatasetError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise DatasetError(f"{path}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    else:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise DatasetError(f"{path}: the csv spec must be an object of column names")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    return spec


def parse_columns(text: str) -> dict[str, Any]:
    """`--csv-columns path=file,labels=findings,patient=pid` -> a spec (findings: `;`-separated)."""
    spec: dict[str, Any] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise DatasetError(f"csv_columns={item!r}: not KEY=COLUMN")
        if key not in SPEC_KEYS:
            raise DatasetError(f"csv_columns={item!r}: unknown key {key!r}; known: {sorted(SPEC_KEYS)}")
        spec[key] = [v.strip() for v in value.split(";")] if key == "findings" else value.strip()
    return spec


def _locate(root: Path, opts: DatasetOptions) -> tuple[Path, dict[str, Any]]:
    """(the CSV file, the spec) for a root that is a CSV file or a folder holding one."""
    spec: dict[str, Any] = {}
    folder = root.parent if root.is_file() else root
    spec_file = (
        Path(opts.csv_spec) if opts.csv_spec else next((folder / n for n in SPEC_FILES if (folder / n).is_file()), None)
    )
    if spec_file is not None:
        spec = load_spec(spec_file)
    if opts.csv_columns:
        spec = {**spec, **parse_columns(opts.csv_columns)}  # flags win over the spec file
    if root.is_file():
        return root, spec
    if not root.is_dir():
        raise DatasetError(f"csv:{root}: no such file or folder")
    if "file" in spec:
        if not isinstance(spec["file"], str) or not spec["file"].strip():
            raise DatasetError(f"csv:{root}: the spec's 'file' must be a file name")
        labels = folder / spec["file"]
        if not opts.allow_outside_root and not _inside(folder, str(labels)):
            raise DatasetError(
                f"csv:{root}: labels file {short_text(spec['file'])} is outside the dataset folder "
                "(allow with allow_outside_root=True)"
            )
        return labels, spec
    found = sorted(p for p in root.iterdir() if p.name.lower().endswith((".csv", ".csv.gz")))
    if len(found) != 1:
        raise DatasetError(
            f"csv:{root}: expected one labels file ROOT/*.csv (or name it in {SPEC_FILES[0]}: "
            f'{{"file": ...}}); found {len(found)}'
        )
    return found[0], spec


def _column(frame: Any, spec: dict[str, Any], key: str, path: Path, required: bool = False) -> str | None:
    if key in spec:
        name = spec[key]
        if name not in frame.columns:
            raise DatasetError(f"{path}: column {name!r} (the spec's {key!r}) not found; found {list(frame.columns)}")
        return str(name)
    lower = {str(c).lower(): str(c) for c in frame.columns}
    for guess in GUESSES[key]:
        if guess.lower() in lower:
            return lower[guess.lower()]
    if required:
        raise DatasetError(
            f"{path}: no {key} column; expected one of {list(GUESSES[key])} or name it in a spec ({SPEC_FILES[0]})"
        )
    return None


def read_table(root: Path, opts: DatasetOptions) -> TableIndex:
    import pandas as pd

    csv_path, spec = _locate(root, opts)
    if not csv_path.is_file():
        raise DatasetError(f"csv:{root}: labels file {csv_path} not found")
    frame = read_csv(csv_path, dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    cols = {key: _column(frame, spec, key, csv_path, required=key == "path") for key in GUESSES}
    path_col = cols["path"] or ""  # required=True: _column raised if there is none
    sep = str(spec.get("separator", "|"))
    if cols["labels"] is not None and "findings" not in spec:
        names, raw = _pipe_labels(frame[cols["labels"]].tolist(), sep, csv_path, cols["labels"])
    elif cols["labels"] is not None:
        names, raw = _pipe_labels(frame[cols["labels"]].tolist(), sep, csv_path, cols["labels"], spec["findings"])
    else:
        used = {c for c in cols.values() if c is not None}
        names = tuple(spec["findings"]) if "findings" in spec else tuple(c for c in frame.columns if c not in used)
        if not names:
            raise DatasetError(f"{csv_path}: no label columns; give one column per finding or a labels column")
        raw = np.full((len(frame), len(names)), np.nan, dtype=np.float32)
        for j, name in enumerate(names):
            if name not in frame.columns:
                raise DatasetError(f"{csv_path}: finding column {name!r} not found")
            raw[:, j] = _states(frame[name].tolist(), csv_path, name)
    base = csv_path.parent
    rel = [p.strip() for p in frame[path_col].tolist()]
    empty = [i for i, p in enumerate(rel) if not p]
    if empty:
        raise DatasetError(f"{csv_path} line {empty[0] + 2}, column {path_col!r}: empty path")
    if not opts.allow_outside_root:
        top = root if root.is_dir() else root.parent
        outside = next((i for i, p in enumerate(rel) if not _inside(top, os.path.join(base, p))), None)
        if outside is not None:
            raise DatasetError(
                f"{csv_path} line {outside + 2}, column {path_col!r}: {short_text(rel[outside])} is outside the "
                f"dataset folder {top} (allow with allow_outside_root=True)"
            )
    if len(set(rel)) != len(rel):
        dup = pd.Series(rel).duplicated().to_numpy()
        row = int(np.flatnonzero(dup)[0])
        raise DatasetError(f"{csv_path} line {row + 2}, column {path_col!r}: {short_text(rel[row])} is listed twice")
    patients = (
        frame[cols["patient"]].str.strip().to_numpy(dtype=object) if cols["patient"] else np.array(rel, dtype=object)
    )
    notes = [] if cols["patient"] else ["no patient column: each image counts as its own patient"]
    if cols["split"]:
        values = frame[cols["split"]].str.strip().str.lower()
        bad = ~values.isin(list(SPLIT_NAMES))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DatasetError(
                f"{csv_path} line {row + 2}, column {cols['split']!r}: split {short_text(values.iloc[row])} is not "
                "train, val or test"
            )
        split = values.map(SPLIT_NAMES).to_numpy(dtype=object)
        split_source = f"column {cols['split']!r}"
    else:
        split = carve_splits(patients, opts.val_fraction, opts.test_fraction, opts.seed)
        split_source = f"carved by patient: test {opts.test_fraction:.0%}, val {opts.val_fraction:.0%} of the rest, seed {opts.seed}"
    view = normalise_view(frame[cols["view"]].tolist()) if cols["view"] else np.full(len(frame), "UNKNOWN", object)
    out = pd.DataFrame(
        {
            "image": rel,
            "relpath": rel,
            "patient_id": patients,
            "study_id": frame[cols["study"]].to_numpy(dtype=object) if cols["study"] else None,
            "view": view,
            "frontal": frontal_from_view(view),
            "sex": normalise_sex(frame[cols["sex"]].tolist()) if cols["sex"] else None,
            "age": to_age(frame[cols["age"]].tolist()) if cols["age"] else np.nan,
            "split": split,
        }
    )
    index = TableIndex(
        dataset="csv",
        root=root,
        labels_file=csv_path,
        frame=out,
        raw=raw,
        labels=apply_uncertain(raw, opts.uncertain),
        pathologies=tuple(names),
        split_source=split_source,
        notes=notes,
        uncertain=opts.uncertain,
        n_label_rows=len(frame),
    )
    return finish_index(index, base, opts)


def _inside(folder: Path, path: str) -> bool:
    """`path`, with `..` taken lexically, lies in `folder`. Symbolic links are not followed: a
    dataset whose image folder links to another disk is the user's own layout."""
    top = os.path.abspath(folder)
    return os.path.commonpath([top, os.path.abspath(path)]) == top


def short_text(value: str, limit: int = 80) -> str:
    """repr of a cell, cut to `limit` characters: an error never echoes a whole hostile value."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value):,} characters)"


def _states(values: list[str], path: Path, column: str) -> np.ndarray:
    table = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": np.nan}
    out = np.empty(len(values), dtype=np.float32)
    for i, v in enumerate(values):
        state = table.get(v.strip())
        if state is None:
            raise DatasetError(f"{path} line {i + 2}, column {column!r}: {short_text(v)} is not 1, 0, -1 or blank")
        out[i] = state
    return out


def _pipe_labels(
    values: list[str], sep: str, path: Path, column: str, findings: list[str] | None = None
) -> tuple[tuple[str, ...], np.ndarray]:
    parsed = [[p.strip() for p in v.split(sep) if p.strip()] for v in values]
    parsed = [[] if p in (["No Finding"], ["No finding"], ["normal"]) else p for p in parsed]
    names = tuple(findings) if findings else tuple(sorted({n for p in parsed for n in p}))
    position = {n: j for j, n in enumerate(names)}
    raw = np.zeros((len(values), len(names)), dtype=np.float32)
    for i, parts in enumerate(parsed):
        for name in parts:
            j = position.get(name)
            if j is None:
                raise DatasetError(
                    f"{path} line {i + 2}, column {column!r}: finding {short_text(name)} is not in {short_text(str(list(names)), 200)}"
                )
            raw[i, j] = 1.0
    return names, raw
