"""PadChest (BIMCV, Hospital San Juan de Alicante).

Layout (Bustos et al. 2020, https://bimcv.cipf.es/bimcv-projects/padchest/; checked against
torchxrayvision's `PC_Dataset`, torchxrayvision/datasets.py, v1.5.7):
`PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv` (plain or .gz) with ImageID, ImageDir,
StudyDate_DICOM, PatientID, PatientBirth, PatientSex_DICOM, Projection and `Labels`, a Python
list string such as "['pleural effusion', 'cardiomegaly']". Images are 16-bit PNGs at
`ROOT/<ImageDir>/<ImageID>`. Labels come from the whole report, so a term not listed is
negative. A `Labels` value that is empty or does not parse as a list of strings is reported
and its row skipped, not guessed. No official split: carved by patient.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from chestxray.data.common import (
    DatasetOptions,
    TableIndex,
    find_file,
    finish_index,
    frontal_from_view,
    normalise_sex,
    normalise_view,
    read_csv,
    require_columns,
)
from chestxray.data.datasets.carve import carve_splits
from chestxray.errors import DatasetError

log = logging.getLogger(__name__)

LABELS_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
COLUMNS = (
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "Labels",
)


# A cell is a flat Python list of quoted terms; read with a regular expression (linear time)
# rather than ast.literal_eval, which a crafted cell drives into MemoryError or RecursionError.
_TERM = r"""\s*(?:'[^'\\]*'|"[^"\\]*")"""
_LIST = re.compile(rf"\[(?:{_TERM}(?:\s*,{_TERM})*(?:\s*,)?)?\s*\]")
_QUOTED = re.compile(r"'([^'\\]*)'|" + r'"([^"\\]*)"')
MAX_CELL = 10_000  # characters; the longest real cell is a few hundred


def parse_labels(text: object) -> list[str] | None:
    """The terms of one `Labels` cell, or None when it is not a list of strings."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_CELL:
        return None
    cell = text.strip()
    if not _LIST.fullmatch(cell):
        return None
    terms = [a or b for a, b in _QUOTED.findall(cell)]
    return [t.strip() for t in terms if t.strip()]


def _shown(cell: str) -> str:
    return repr(cell) if len(cell) <= 80 else repr(cell[:80]) + f"... ({len(cell):,} characters)"


def read_padchest(root: Path, opts: DatasetOptions) -> TableIndex:
    import pandas as pd

    path = find_file(root, [LABELS_FILE])
    if path is None:
        raise DatasetError(f"padchest:{root}: no labels file; expected {root / LABELS_FILE} (or .csv.gz)")
    table = read_csv(path, dtype=str, keep_default_na=False, low_memory=False)
    require_columns(table, COLUMNS, path)
    parsed = [parse_labels(t) for t in table["Labels"].tolist()]
    bad = [i for i, p in enumerate(parsed) if p is None]
    notes = []
    if bad:
        examples = ", ".join(f"line {i + 2} ({_shown(table['Labels'].iloc[i])})" for i in bad[:3])
        log.warning("%s: %d rows with unparseable Labels skipped, e.g. %s", path.name, len(bad), examples)
        notes.append(f"{len(bad):,} rows with unparseable Labels skipped, e.g. {examples}")
    ok = np.array([p is not None for p in parsed], dtype=bool)
    table = table.loc[ok].reset_index(drop=True)
    terms = [p for p in parsed if p is not None]
    names = tuple(sorted({t for p in terms for t in p}))
    position = {n: j for j, n in enumerate(names)}
    raw = np.zeros((len(terms), len(names)), dtype=np.float32)
    for i, p in enumerate(terms):
        raw[i, [position[t] for t in p]] = 1.0
    rel = (table["ImageDir"].str.strip() + "/" + table["ImageID"].str.strip()).tolist()
    birth = pd.to_numeric(table["PatientBirth"], errors="coerce")
    year = pd.to_numeric(table["StudyDate_DICOM"].str[:4], errors="coerce")
    view = normalise_view(table["Projection"].tolist())
    patients = table["PatientID"].str.strip().to_numpy(dtype=object)
    frame = pd.DataFrame(
        {
            "image": table["ImageID"].str.strip().to_numpy(dtype=object),
            "relpath": rel,
            "patient_id": patients,
            "study_id": table["StudyID"].to_numpy(dtype=object) if "StudyID" in table.columns else None,
            "view": view,
            "frontal": frontal_from_view(view),
            "sex": normalise_sex(table["PatientSex_DICOM"].tolist()),
            "age": (year - birth).to_numpy(dtype=float),
            "split": carve_splits(patients, opts.val_fraction, opts.test_fraction, opts.seed),
        }
    )
    if frame["image"].duplicated().any():
        row = int(np.flatnonzero(frame["image"].duplicated().to_numpy())[0])
        raise DatasetError(f"{path}: ImageID {frame['image'].iloc[row]!r} is listed twice")
    index = TableIndex(
        dataset="padchest",
        root=root,
        labels_file=path,
        frame=frame,
        raw=raw,
        labels=raw.copy(),
        pathologies=names,
        split_source=(
            f"carved by patient: test {opts.test_fraction:.0%}, val {opts.val_fraction:.0%} of the rest, seed {opts.seed}"
        ),
        notes=notes,
        n_label_rows=len(parsed),
    )
    return finish_index(index, root, opts)
