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


def parse_finding_labels(value: str, row: object = None) -> np.ndarray:
    """Parse one "Finding Labels" cell ("A|B", "No Finding") into a multi-hot float32 vector."""
    out = np.zeros(len(FINDINGS), dtype=np.float32)
    text = (value or "").strip()
    if text == NO_FINDING:
        return out
    if not text:
        where = f" in row {row}" if row is not None else ""
        raise LabelError(f"empty 'Finding Labels'{where}")
    for part in text.split("|"):
        name = ALIASES.get(part.strip(), part.strip())
        idx = _INDEX.get(name)
        if idx is None:
            where = f"row {row}: " if row is not None else ""
            raise LabelError(
                f"{where}unknown label {part.strip()!r} in 'Finding Labels' {value!r}; "
                f"known: {', '.join(FINDINGS)}, or {NO_FINDING!r}"
            )
        out[idx] = 1.0
    return out


def labels_matrix(values: Iterable[str], rows: Sequence[object] | None = None) -> np.ndarray:
    """Multi-hot matrix (N x 14, float32) for many "Finding Labels" cells."""
    vals = list(values)
    names = rows if rows is not None else range(len(vals))
    if not vals:
        return np.zeros((0, len(FINDINGS)), dtype=np.float32)
    return np.stack([parse_finding_labels(v, r) for v, r in zip(vals, names)])


def format_findings(vector: Sequence[float] | np.ndarray, names: Sequence[str] = FINDINGS) -> str:
    """'A|B' or 'No Finding' for a multi-hot vector (inverse of parse_finding_labels)."""
    on = [n for n, v in zip(names, vector) if v >= 0.5]
    return "|".join(on) if on else NO_FINDING
