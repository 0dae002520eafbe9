"""CheXpert v1.0 (Stanford) and its "small" release; also the shared logic of MIMIC-CXR-JPG,
whose labels come from the same labeler.

Layout (Irvin et al. 2019; https://stanfordmlgroup.github.io/competitions/chexpert/; checked
against torchxrayvision's `CheX_Dataset`, torchxrayvision/datasets.py, v1.5.7):
`CheXpert-v1.0-small/train.csv` and `valid.csv` (plain or .gz), columns `Path,Sex,Age,
Frontal/Lateral,AP/PA` and 14 observations valued 1.0 / 0.0 / -1.0 (uncertain) / blank (not
mentioned). `Path` is relative to the folder holding `CheXpert-v1.0-small/` (or `CheXpert-v1.0/`).
The patient is `patientNNNNN` in the path, the study `studyN` below it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.data.common import (
    DatasetOptions,
    TableIndex,
    apply_uncertain,
    find_file,
    finish_index,
    frontal_from_view,
    normalise_sex,
    normalise_view,
    read_csv,
    require_columns,
    to_age,
)
from chestxray.errors import DatasetError

OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
PATIENT_STUDY = re.compile(r"(patient\d+)/study\d+")
NO_FINDING_NOTE = (
    "blank observations in rows with 'No Finding' = 1 count as negative (except Support Devices), "
    "as torchxrayvision does"
)


def fill_no_finding(raw: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Blanks of rows whose 'No Finding' is 1 become 0 (except Support Devices), in place;
    returns how many were filled per column. torchxrayvision overwrites every value of such
    rows; only blanks are filled here, so an explicit uncertain or positive is kept."""
    healthy = raw[:, names.index("No Finding")] == 1
    filled = np.zeros(len(names), dtype=np.int64)
    for j, name in enumerate(names):
        if name in ("No Finding", "Support Devices"):
            continue
        blank = healthy & np.isnan(raw[:, j])
        filled[j] = int(blank.sum())
        raw[blank, j] = 0.0
    return filled


def observation_matrix(frame: Any, path: Path) -> np.ndarray:
    """N x 14 float32 raw states of the observation columns; an error names row and column of
    any value other than 1, 0, -1 or blank."""
    raw = np.full((len(frame), len(OBSERVATIONS)), np.nan, dtype=np.float32)
    for j, name in enumerate(OBSERVATIONS):
        col = frame[name]
        values = col.to_numpy(dtype=np.float32) if col.dtype.kind == "f" else _numeric(col, name, path)
        bad = ~np.isnan(values) & ~np.isin(values, (1.0, 0.0, -1.0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DatasetError(f"{path} line {row + 2}, column {name!r}: value {values[row]} is not 1, 0, -1 or blank")
        raw[:, j] = values
    return raw


def _numeric(col: Any, name: str, path: Path) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(col, errors="coerce")
    bad = values.isna() & col.notna() & (col.astype(str).str.strip() != "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2}, column {name!r}: {col.iloc[row]!r} is not 1, 0, -1 or blank")
    return values.to_numpy(dtype=np.float32)


def _release_folder(root: Path) -> tuple[Path, Path]:
    """(folder holding train.csv, folder the `Path` column is relative to)."""
    for release in RELEASES:
        if find_file(root / release, ["train.csv", "valid.csv"]):
            return root / release, root
    if find_file(root, ["train.csv", "valid.csv"]):
        return root, root.parent
    raise DatasetError(
        f"chexpert:{root}: no CheXpert label file; expected {root / RELEASES[0] / 'train.csv'} "
        f"(or .csv.gz; or {RELEASES[1]}/, or train.csv in the root itself)"
    )


def read_chexpert(root: Path, opts: DatasetOptions) -> TableIndex:
    import pandas as pd

    folder, base = _release_folder(root)
    parts, missing_files, used = [], [], []
    dtypes = {name: "float32" for name in OBSERVATIONS}
    for file, split in (("train.csv", "train"), ("valid.csv", "val")):
        path = find_file(folder, [file])
        if path is None:
            missing_files.append(str(folder / file))
            continue
        frame = read_csv(path, dtype={**dtypes, "Path": str, "Sex": str, "Frontal/Lateral": str, "AP/PA": str})
        require_columns(frame, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS], path)
        frame["split"] = split
        frame["source"] = path
        parts.append(frame)
        used.append(path)
    table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    raw = observation_matrix(table, used[0])
    rel = table["Path"].to_numpy(dtype=object)
    found = [PATIENT_STUDY.search(p) for p in rel]
    missing = [i for i, m in enumerate(found) if m is None]
    if missing:
        raise DatasetError(f"{used[0]}: Path {rel[missing[0]]!r} has no patientNNNNN/studyN part")
    patients = np.array([m.group(1) for m in found if m is not None], dtype=object)
    studies = np.array([m.group(0) for m in found if m is not None], dtype=object)
    lateral = table["Frontal/Lateral"].str.strip().str.lower() == "lateral"
    view = normalise_view(table["AP/PA"].to_numpy(dtype=object))
    is_frontal = (table["Frontal/Lateral"].str.strip().str.lower() == "frontal").to_numpy()
    view[is_frontal & (view == "LATERAL")] = "UNKNOWN"  # frontal images whose AP/PA says LL or RL
    view[lateral.to_numpy()] = "LATERAL"
    frontal = frontal_from_view(view)
    frontal[is_frontal] = True
    out = pd.DataFrame(
        {
            "image": rel,
            "relpath": rel,
            "patient_id": patients,
            "study_id": studies,
            "view": view,
            "frontal": frontal,
            "sex": normalise_sex(table["Sex"].to_numpy(dtype=object)),
            "age": to_age(table["Age"].to_numpy()),
            "split": table["split"].to_numpy(dtype=object),
        }
    )
    return finish_table(
        "chexpert", root, base, used[0], out, raw, OBSERVATIONS, opts, missing_files, "official: train.csv / valid.csv"
    )


def finish_table(
    dataset: str,
    root: Path,
    base: Path,
    labels_file: Path,
    frame: Any,
    raw: np.ndarray,
    names: tuple[str, ...],
    opts: DatasetOptions,
    missing_files: list[str],
    split_source: str,
) -> TableIndex:
    """Shared tail of the CheXpert-labeler readers: No Finding rule, uncertainty policy,
    image lookup, missing-image policy."""
    n_rows = len(frame)
    states = raw.copy()  # the file's own states, for `info`
    filled = fill_no_finding(raw, names)
    labels = apply_uncertain(raw, opts.uncertain)
    notes = [NO_FINDING_NOTE, f"uncertain (-1) labels: {opts.uncertain}"]
    notes += [f"{m} not found (that split is empty)" for m in missing_files]
    index = TableIndex(
        dataset=dataset,
        root=root,
        labels_file=labels_file,
        frame=frame,
        raw=states,
        labels=labels,
        pathologies=names,
        split_source=split_source,
        notes=notes,
        missing_files=missing_files,
        filled_negative=filled,
        uncertain=opts.uncertain,
        n_label_rows=n_rows,
    )
    return finish_index(index, base, opts)
