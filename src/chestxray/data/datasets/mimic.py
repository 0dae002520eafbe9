"""MIMIC-CXR-JPG 2.0.0 / 2.1.0 (same file names in both).

Layout (Johnson et al. 2019, https://physionet.org/content/mimic-cxr-jpg/2.1.0/; checked
against torchxrayvision's `MIMIC_Dataset`, torchxrayvision/datasets.py, v1.5.7):
`mimic-cxr-2.0.0-chexpert.csv.gz` (or `-negbio`), one row per *study* (subject_id, study_id,
the 14 CheXpert observations as 1 / 0 / -1 / blank); `mimic-cxr-2.0.0-metadata.csv.gz`, one
row per image (dicom_id, subject_id, study_id, ViewPosition, ...); `mimic-cxr-2.0.0-split.csv.gz`
(dicom_id, study_id, subject_id, split = train / validate / test). Images
`files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`, XX the first two digits of the subject id.
A study without a label row is unlabelled (all unknown). Sex and age are not part of the release.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chestxray.data.common import DatasetOptions, TableIndex, find_file, frontal_from_view, normalise_view, read_csv
from chestxray.data.common import require_columns as _require
from chestxray.data.datasets.chexpert import OBSERVATIONS, finish_table, observation_matrix
from chestxray.errors import DatasetError

PREFIX = "mimic-cxr-2.0.0"
SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}


def read_mimic(root: Path, opts: DatasetOptions) -> TableIndex:
    import pandas as pd

    def need(names: list[str]) -> Path:
        path = find_file(root, names)
        if path is None:
            raise DatasetError(f"mimic:{root}: expected {root / names[0]}.gz (or plain .csv)")
        return path

    labels_path = need([f"{PREFIX}-chexpert.csv", f"{PREFIX}-negbio.csv"])
    meta_path = need([f"{PREFIX}-metadata.csv"])
    split_path = need([f"{PREFIX}-split.csv"])
    ids = {"subject_id": "int64", "study_id": "int64"}
    meta = read_csv(meta_path, dtype={**ids, "dicom_id": str, "ViewPosition": str})
    _require(meta, ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta_path)
    split = read_csv(split_path, dtype={**ids, "dicom_id": str, "split": str})
    _require(split, ["dicom_id", "subject_id", "study_id", "split"], split_path)
    lab = read_csv(labels_path, dtype={**ids, **{o: "float32" for o in OBSERVATIONS}})
    _require(lab, ["subject_id", "study_id", *OBSERVATIONS], labels_path)
    bad = ~split["split"].isin(list(SPLIT_NAMES))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DatasetError(
            f"{split_path} line {row + 2}, column 'split': {split['split'].iloc[row]!r} is not train, validate or test"
        )
    table = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="left")
    if table["split"].isna().any():
        row = int(np.flatnonzero(table["split"].isna().to_numpy())[0])
        raise DatasetError(f"{split_path}: image {table['dicom_id'].iloc[row]} of {meta_path.name} has no split row")
    labelled = lab.drop_duplicates(["subject_id", "study_id"]).assign(_labelled=True)
    table = table.merge(labelled, on=["subject_id", "study_id"], how="left")
    raw = observation_matrix(table, labels_path)  # studies without a label row: all NaN
    subject = table["subject_id"].astype(str)
    study = table["study_id"].astype(str)
    rel = ("files/p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + table["dicom_id"] + ".jpg").tolist()
    view = normalise_view(table["ViewPosition"].to_numpy(dtype=object))
    frame = pd.DataFrame(
        {
            "image": rel,
            "relpath": rel,
            "patient_id": subject.to_numpy(dtype=object),
            "study_id": study.to_numpy(dtype=object),
            "view": view,
            "frontal": frontal_from_view(view),
            "sex": None,
            "age": np.nan,
            "split": table["split"].map(SPLIT_NAMES).to_numpy(dtype=object),
        }
    )
    index = finish_table(
        "mimic", root, root, labels_path, frame, raw, OBSERVATIONS, opts, [], f"official: {split_path.name}"
    )
    unlabelled = int((~table["_labelled"].fillna(False).astype(bool)).sum())
    if unlabelled:
        index.notes.append(f"{unlabelled:,} images belong to studies without a row in {labels_path.name} (unknown)")
    return index
