"""VinDr-CXR as released for the VinBigData Kaggle challenge.

Layout (Nguyen et al. 2022, https://www.kaggle.com/c/vinbigdata-chest-xray-abnormalities-detection;
checked against torchxrayvision's `VinDr_Dataset`, torchxrayvision/datasets.py, v1.5.7):
`train.csv` (plain or .gz) with one row per radiologist finding,
`image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max`, three radiologists per image,
"No finding" (class 14) without a box; images `train/<image_id>.dicom`. The release has no
patient id and no official split: each image is its own patient and the split is carved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from chestxray.data.common import (
    DatasetOptions,
    TableIndex,
    find_file,
    finish_index,
    read_csv,
    require_columns,
)
from chestxray.data.datasets.carve import carve_splits
from chestxray.errors import DatasetError

CLASSES = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
)
NO_FINDING = "No finding"
RULES = ("any", "majority")


def read_vindr_rows(root: Path) -> tuple[Path, Any]:
    path = find_file(root, ["train.csv"])
    if path is None:
        raise DatasetError(f"vindr:{root}: no labels file; expected {root / 'train.csv'} (or train.csv.gz)")
    rows = read_csv(path, dtype={"image_id": str, "class_name": str, "rad_id": str})
    require_columns(rows, ["image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"], path)
    unknown = ~rows["class_name"].isin([*CLASSES, NO_FINDING])
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DatasetError(
            f"{path} line {row + 2}, column 'class_name': unknown class {rows['class_name'].iloc[row]!r}"
        )
    return path, rows


def read_vindr(root: Path, opts: DatasetOptions) -> TableIndex:
    import pandas as pd

    if opts.vindr_rule not in RULES:
        raise DatasetError(f"unknown VinDr label rule {opts.vindr_rule!r}; choose any or majority")
    path, rows = read_vindr_rows(root)
    images = np.array(sorted(rows["image_id"].unique()), dtype=object)
    readers = rows.groupby("image_id")["rad_id"].nunique().reindex(images).to_numpy()
    # Radiologists naming each class per image (a reader may draw several boxes of one class).
    votes = (
        rows[rows["class_name"] != NO_FINDING]
        .groupby(["image_id", "class_name"])["rad_id"]
        .nunique()
        .unstack(fill_value=0)
        .reindex(index=images, columns=list(CLASSES), fill_value=0)
        .to_numpy()
    )
    if opts.vindr_rule == "any":
        raw = (votes >= 1).astype(np.float32)
    else:
        raw = (votes * 2 > readers[:, None]).astype(np.float32)
    rel = [f"train/{i}.dicom" for i in images]
    frame = pd.DataFrame(
        {
            "image": images,
            "relpath": rel,
            "patient_id": images,
            "study_id": images,
            "view": "UNKNOWN",
            "frontal": None,
            "sex": None,
            "age": np.nan,
            "split": carve_splits(images, opts.val_fraction, opts.test_fraction, opts.seed),
        }
    )
    index = TableIndex(
        dataset="vindr",
        root=root,
        labels_file=path,
        frame=frame,
        raw=raw,
        labels=raw.copy(),
        pathologies=CLASSES,
        split_source=(
            f"carved by image (no patient ids, no official split): test {opts.test_fraction:.0%}, "
            f"val {opts.val_fraction:.0%} of the rest, seed {opts.seed}"
        ),
        notes=[
            f"image label = {opts.vindr_rule} of its {int(np.median(readers)) if len(readers) else 0} radiologists",
            f"images with only '{NO_FINDING}': {int((raw.sum(1) == 0).sum()):,}",
        ],
        n_label_rows=len(rows),
    )
    return finish_index(index, root, opts)
