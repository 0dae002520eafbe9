"""The dataset registry: `NAME:PATH` -> a reader -> one common index (`data.common`).

A bare path means NIH ChestX-ray14, as before. Readers import pandas lazily.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chestxray.data.common import DatasetIndex, DatasetOptions, filter_views
from chestxray.errors import DatasetError


@dataclass(frozen=True)
class Reader:
    name: str
    title: str
    layout: str
    function: str  # `module:function` below chestxray.data.datasets, imported on first use
    has_laterals: bool = False

    def read(self, root: Path, opts: DatasetOptions) -> DatasetIndex:
        module, _, function = self.function.partition(":")
        reader: Callable[[Path, DatasetOptions], DatasetIndex] = getattr(
            importlib.import_module(f"{__name__}.{module}"), function
        )
        return reader(root, opts)


READERS: dict[str, Reader] = {
    r.name: r
    for r in (
        Reader(
            "nih",
            "NIH ChestX-ray14",
            "Data_Entry_2017*.csv, train_val_list.txt, test_list.txt, PNGs below",
            "nih:read_nih",
        ),
        Reader(
            "chexpert",
            "CheXpert v1.0 / v1.0-small",
            "CheXpert-v1.0-small/train.csv, valid.csv (Path relative to ROOT), JPEGs",
            "chexpert:read_chexpert",
            has_laterals=True,
        ),
        Reader(
            "mimic",
            "MIMIC-CXR-JPG 2.0.0 / 2.1.0",
            "mimic-cxr-2.0.0-{chexpert,metadata,split}.csv.gz, files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg",
            "mimic:read_mimic",
            has_laterals=True,
        ),
        Reader(
            "padchest",
            "PadChest",
            "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz), 16-bit PNGs in ImageDir folders",
            "padchest:read_padchest",
            has_laterals=True,
        ),
        Reader(
            "vindr",
            "VinDr-CXR (VinBigData challenge)",
            "train.csv (one row per finding and reader), train/<image_id>.dicom",
            "vindr:read_vindr",
        ),
        Reader(
            "csv",
            "any labelled spreadsheet",
            "a CSV (path column + finding columns or a '|' column), optional dataset.json",
            "table:read_table",
        ),
    )
}
_SPEC = re.compile(r"^([A-Za-z][A-Za-z0-9_]+):(.+)$")


def parse_root(text: str) -> tuple[str, Path]:
    """`NAME:PATH` -> (name, path); a bare path is NIH. An unknown NAME is an error unless
    the whole text is an existing path (a folder may contain a colon)."""
    m = _SPEC.match(text.strip())
    if m and not Path(text).exists():
        name = m.group(1).lower()
        if name not in READERS:
            raise DatasetError(f"unknown dataset {m.group(1)!r} in {text!r}; known: {', '.join(READERS)} (NAME:PATH)")
        return name, Path(m.group(2))
    return "nih", Path(text)


def open_dataset(text: str, opts: DatasetOptions | None = None) -> DatasetIndex:
    """Read a `NAME:PATH` root into the common index, filtered by `opts.views`."""
    opts = opts or DatasetOptions()
    name, root = parse_root(text)
    if not root.exists():
        raise DatasetError(f"{name}:{root}: dataset root not found")
    index = READERS[name].read(root, opts)
    return filter_views(index, opts.views)
