"""The 14 NIH ChestX-ray14 findings, their order, and parsing of "Finding Labels"."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from chestxray.errors import LabelError

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
_INDEX = {name: i for i, name in enumerate(FINDINGS)}
# Spellings found in NIH side files (BBox_List_2017.csv says "Infiltrate").
ALIASES = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}


def canonical_finding(name: str) -> str:
    """The package's spelling of a finding name; raises LabelError if unknown."""
    name = name.strip()
    name = ALIASES.get(name, name)
    if name not in _INDEX:
        raise LabelError(f"unknown finding {name!r}; known: {', '.join(FINDINGS)}")
    return name


def _where(row: object) -> str:
    if row is None:
        return ""
    return f"row {row}: " if isinstance(row, int) else f"{row}: "


def parse_finding_labels(value: str, row: object = None) -> np.ndarray:
    """Parse one "Finding Labels" cell ("A|B", "No Finding") into a multi-hot float32 vector.

    `row` (a row number, or a description such as "Data_Entry_2017.csv line 7
    (00000003_000.png)") is named in the LabelError raised for an unknown label.
    """
    out = np.zeros(len(FINDINGS), dtype=np.float32)
    text = (value or "").strip()
    if text == NO_FINDING:
        return out
    if not text:
        raise LabelError(f"{_where(row)}empty 'Finding Labels'")
    for part in text.split("|"):
        name = ALIASES.get(part.strip(), part.strip())
        idx = _INDEX.get(name)
        if idx is None:
            if name == NO_FINDING:
                why = f"{NO_FINDING!r} together with findings"
            elif not name:
                why = "an empty label (stray '|')"
            else:
                why = f"unknown label {name!r}"
            raise LabelError(
                f"{_where(row)}{why} in 'Finding Labels' {value!r}; "
                f"known: {', '.join(FINDINGS)}, or {NO_FINDING!r} alone"
            )
        out[idx] = 1.0
    return out


def labels_matrix(values: Iterable[str], rows: Sequence[object] | None = None) -> np.ndarray:
    """Multi-hot matrix (N x 14, float32) for many "Finding Labels" cells; `rows` names
    each cell in errors (default: its position)."""
    vals = list(values)
    if rows is not None and len(rows) != len(vals):
        raise ValueError(f"labels_matrix: {len(vals)} values but {len(rows)} row names")
    names = rows if rows is not None else range(len(vals))
    out = np.zeros((len(vals), len(FINDINGS)), dtype=np.float32)
    cache: dict[str, np.ndarray] = {}  # NIH has ~800 distinct label strings for 112k rows
    for k, (v, r) in enumerate(zip(vals, names)):
        vec = cache.get(v)
        if vec is None:
            vec = cache[v] = parse_finding_labels(v, r)
        out[k] = vec
    return out


def format_findings(vector: Sequence[float] | np.ndarray, names: Sequence[str] = FINDINGS) -> str:
    """'A|B' or 'No Finding' for a multi-hot vector (inverse of parse_finding_labels)."""
    on = [n for n, v in zip(names, vector) if v >= 0.5]
    return "|".join(on) if on else NO_FINDING
