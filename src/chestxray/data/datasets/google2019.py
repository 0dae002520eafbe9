"""Google's 2019 expert labels for NIH ChestX-ray14 (Majkowska et al., Radiology 2020).

`google2019_nih-chest-xray-labels.csv(.gz)`: 4,376 NIH images with the NIH columns plus
adjudicated YES / NO for Fracture, Pneumothorax, Airspace opacity and Nodule or mass, and
`Set Id` (test / val). Layout checked against torchxrayvision's `NIH_Google_Dataset`
(torchxrayvision/datasets.py, v1.5.7). The result is the NIH index restricted to these
images, with the four expert labels and Google's own split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chestxray.data.common import DatasetIndex, TableIndex, read_csv, require_columns
from chestxray.errors import DatasetError

FINDINGS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
STATES = {"YES": 1.0, "NO": 0.0, "": np.nan}


def with_google_labels(nih: DatasetIndex, path: Path) -> TableIndex:
    if not path.is_file():
        raise DatasetError(f"labels=google2019:{path}: file not found")
    table = read_csv(path, dtype=str, keep_default_na=False)
    require_columns(table, ["Image Index", "Set Id", *FINDINGS], path)
    raw = np.full((len(table), len(FINDINGS)), np.nan, dtype=np.float32)
    for j, name in enumerate(FINDINGS):
        values = table[name].str.strip().str.upper()
        bad = ~values.isin(list(STATES))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DatasetError(f"{path} line {row + 2}, column {name!r}: {table[name].iloc[row]!r} is not YES or NO")
        raw[:, j] = values.map(STATES).to_numpy(dtype=np.float32)
    split = table["Set Id"].str.strip().str.lower().map({"test": "test", "val": "val", "valid": "val"})
    if split.isna().any():
        row = int(np.flatnonzero(split.isna().to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2}, column 'Set Id': {table['Set Id'].iloc[row]!r} is not test or val")
    where = {name: i for i, name in enumerate(table["Image Index"].str.strip())}
    rows = np.array([where.get(n, -1) for n in nih.frame["image"]], dtype=np.int64)
    keep = rows >= 0
    frame = nih.frame.loc[keep].reset_index(drop=True)
    rows = rows[keep]
    frame["split"] = split.to_numpy(dtype=object)[rows]
    frame["relpath"] = frame["image"]
    raw = raw[rows]
    return TableIndex(
        dataset="google2019",
        root=nih.root,
        labels_file=path,
        frame=frame,
        raw=raw,
        labels=raw.copy(),
        pathologies=FINDINGS,
        split_source=f"Google's Set Id (test / val) of {path.name}",
        notes=[f"{len(frame):,} of the file's {len(table):,} images are in {nih.root}"],
        n_label_rows=len(table),
    )
