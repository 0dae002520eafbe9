"""Patient-wise splits for datasets without an official one (same carve as NIH's validation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chestxray.data.index import carve_validation
from chestxray.errors import DatasetError


def carve_splits(
    patients: Sequence[str] | np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """train / val / test per row, drawn by patient with a fixed seed (for datasets without an
    official split): a seeded `test_fraction` of patients, then `val_fraction` of the rest."""
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test fraction must be in [0, 1), got {test_fraction}")
    patients = np.asarray(patients, dtype=object)
    test = carve_validation(patients, test_fraction, seed) if test_fraction > 0 else set()
    rest = patients[~np.isin(patients, list(test))] if test else patients
    val = carve_validation(rest, val_fraction, seed + 1) if len(rest) else set()
    return np.array(["test" if p in test else "val" if p in val else "train" for p in patients], dtype=object)
