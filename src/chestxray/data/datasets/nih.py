"""NIH ChestX-ray14 behind the registry: `data.index.load_nih`, unchanged, plus the common
columns (study_id, frontal; age in years as a number)."""

from __future__ import annotations

from pathlib import Path

from chestxray.data.common import DatasetOptions, frontal_from_view, normalise_sex, normalise_view, to_age
from chestxray.data.index import NIHIndex, load_nih


def add_common_columns(index: NIHIndex) -> NIHIndex:
    frame = index.frame
    frame["study_id"] = None
    if "view" in frame.columns:
        frame["view"] = normalise_view(frame["view"].tolist())
    else:
        frame["view"] = "UNKNOWN"
    frame["frontal"] = frontal_from_view(frame["view"].to_numpy())
    frame["sex"] = normalise_sex(frame["sex"].tolist()) if "sex" in frame.columns else None
    frame["age"] = to_age(frame["age"].tolist()) if "age" in frame.columns else float("nan")
    return index


def read_nih(root: Path, opts: DatasetOptions) -> NIHIndex:
    index = load_nih(
        root,
        val_fraction=opts.val_fraction,
        seed=opts.seed,
        allow_missing=opts.allow_missing,
        require_images=opts.require_images,
    )
    return add_common_columns(index)
