"""The NIH ChestX-ray14 index: labels file, image locations, official and validation splits.

Works on the dataset as it ships: `Data_Entry_2017.csv` (first release, trailing empty
column) or `Data_Entry_2017_v2020.csv` (plain or .gz), images anywhere below the root
(`images_001/images/...` from Kaggle, `images/` from the NIH archive), and the official
`train_val_list.txt` / `test_list.txt`. Validation is carved from train_val by patient.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chestxray.errors import DatasetError
from chestxray.labels import FINDINGS, labels_matrix

log = logging.getLogger(__name__)

LABEL_FILES = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
)
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def find_labels_file(root: Path) -> Path:
    for name in LABEL_FILES:
        candidate = root / name
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"{root}: no labels file found; expected one of {', '.join(LABEL_FILES)} in the root"
    )


def read_labels_table(path: Path):  # -> pandas.DataFrame
    """Read the labels CSV into a DataFrame with columns image, labels_text, patient_id."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many parser error types
        raise DatasetError(f"{path}: cannot parse labels file ({exc})") from None
    # First release has a trailing comma -> an unnamed empty column; drop such columns.
    frame = frame.loc[:, [c for c in frame.columns if not str(c).startswith("Unnamed")]]
    for col in ("Image Index", "Finding Labels", "Patient ID"):
        if col not in frame.columns:
            raise DatasetError(f"{path}: missing column {col!r}; found {list(frame.columns)}")
    out = pd.DataFrame(
        {
            "image": frame["Image Index"].str.strip(),
            "labels_text": frame["Finding Labels"].str.strip(),
            "patient_id": frame["Patient ID"].str.strip().map(_patient_key),
        }
    )
    for optional, name in (("View Position", "view"), ("Patient Age", "age"), ("Patient Gender", "sex")):
        if optional in frame.columns:
            out[name] = frame[optional].str.strip()
    dupes = out["image"].duplicated()
    if dupes.any():
        raise DatasetError(f"{path}: image {out['image'][dupes].iloc[0]!r} is listed twice")
    return out


def _patient_key(value: str) -> str:
    value = value.strip()
    return (value.lstrip("0") or "0") if value.isdigit() else value


def read_split_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: official split list not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def scan_images(root: Path) -> dict[str, Path]:
    """Map image file name -> path for every image below root (first found wins)."""
    found: dict[str, Path] = {}
    queue = [root]
    while queue:  # breadth first, sorted: deterministic choice between duplicates
        folder = queue.pop(0)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                if not entry.name.startswith("."):
                    queue.append(Path(entry.path))
            elif entry.name.lower().endswith(IMAGE_EXTS):
                found.setdefault(entry.name, Path(entry.path))
    return found


def carve_validation(patients: np.ndarray, fraction: float, seed: int) -> set[str]:
    """Pick a seeded `fraction` of the unique patients of train_val for validation."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"validation fraction must be in [0, 1), got {fraction}")
    unique = np.array(sorted(set(patients.tolist())))
    rng = np.random.default_rng(seed)
    n_val = int(round(fraction * len(unique)))
    if fraction > 0 and n_val == 0 and len(unique) > 1:
        n_val = 1
    chosen = rng.permutation(len(unique))[:n_val]
    return set(unique[chosen].tolist())


@dataclass
class NIHIndex:
    """All labelled images of a dataset root, with split, patient and label matrix.

    `frame` has one row per image found (or per label row, for a metadata-only root
    opened with require_images=False): image, patient_id, labels_text, split, path.
    `labels` is the N x 14 multi-hot matrix in `pathologies` order.
    """

    root: Path
    labels_file: Path
    frame: object  # pandas.DataFrame
    labels: np.ndarray
    n_label_rows: int
    missing: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    seed: int = 0
    pathologies: tuple[str, ...] = FINDINGS

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def images_found(self) -> int:
        return int(self.frame["path"].notna().sum())

    def split_positions(self, split: str) -> np.ndarray:
        """Row positions (into frame / labels) of one split: train, val, test or all."""
        if split == "all":
            return np.arange(len(self.frame))
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or 'all'")
        return np.flatnonzero(self.frame["split"].to_numpy() == split)

    def patient_overlap(self) -> dict[str, int]:
        """Number of patients shared by each pair of splits (all zero when sound)."""
        groups = {s: set(self.frame.loc[self.frame["split"] == s, "patient_id"]) for s in SPLITS}
        return {
            f"{a}-{b}": len(groups[a] & groups[b])
            for i, a in enumerate(SPLITS)
            for b in SPLITS[i + 1 :]
        }

    def iter_paths(self) -> Iterator[tuple[str, Path]]:
        for name, path in zip(self.frame["image"], self.frame["path"]):
            if path is not None:
                yield name, Path(path)

    def summary(self) -> dict:
        """What `chestxray info` prints: counts, splits, prevalence, overlap."""
        frame = self.frame
        out: dict = {
            "root": str(self.root),
            "labels_file": self.labels_file.name,
            "label_rows": self.n_label_rows,
            "images_found": self.images_found,
            "images_missing": len(self.missing),
            "missing_examples": self.missing[:5],
            "patients": int(frame["patient_id"].nunique()),
            "validation": {"fraction": self.val_fraction, "seed": self.seed, "by": "patient"},
            "official": {
                "train_val": int(frame["split"].isin(["train", "val"]).sum()),
                "test": int((frame["split"] == "test").sum()),
            },
            "splits": {},
            "patient_overlap": self.patient_overlap(),
        }
        for split in SPLITS:
            pos = self.split_positions(split)
            lab = self.labels[pos]
            out["splits"][split] = {
                "images": int(len(pos)),
                "patients": int(frame["patient_id"].iloc[pos].nunique()),
                "no_finding": round(float((lab.sum(1) == 0).mean()) if len(pos) else 0.0, 4),
                "prevalence": {
                    name: round(float(lab[:, i].mean()) if len(pos) else 0.0, 4)
                    for i, name in enumerate(self.pathologies)
                },
            }
        return out


def load_nih(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    allow_missing: bool = False,
    require_images: bool = True,
) -> NIHIndex:
    """Index a dataset root.

    Missing images are an error naming the count and the first few, unless
    `allow_missing` (keep the present subset; a warning says how many were skipped) or
    not `require_images` (metadata only: every label row kept, paths None).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a directory")
    labels_file = find_labels_file(root)
    table = read_labels_table(labels_file)
    n_rows = len(table)
    train_val = read_split_list(root / "train_val_list.txt")
    test = read_split_list(root / "test_list.txt")
    overlap = set(train_val) & set(test)
    if overlap:
        raise DatasetError(
            f"{root}: {len(overlap)} images are in both train_val_list.txt and test_list.txt, "
            f"e.g. {sorted(overlap)[:3]}"
        )
    split = np.full(n_rows, "", dtype=object)
    names = table["image"].to_numpy()
    split[np.isin(names, np.array(train_val))] = "train"
    split[np.isin(names, np.array(test))] = "test"
    table["split"] = split
    unlisted = table["split"] == ""
    if unlisted.any():
        log.warning("%d label rows are in neither split list; left out", int(unlisted.sum()))
        table = table.loc[~unlisted].reset_index(drop=True)

    found = scan_images(root)
    table["path"] = [str(found[n]) if n in found else None for n in table["image"]]
    missing = table.loc[table["path"].isna(), "image"].tolist()
    if missing and require_images:
        if not allow_missing:
            raise DatasetError(
                f"{root}: {len(missing)} of {len(table)} listed images are missing, e.g. "
                f"{', '.join(missing[:5])}; pass --allow-missing to use the {len(table) - len(missing)} present"
            )
        log.warning("%d listed images are missing under %s; using the %d present",
                    len(missing), root, len(table) - len(missing))
        table = table.loc[table["path"].notna()].reset_index(drop=True)

    tv = table["split"] == "train"
    val_patients = carve_validation(table.loc[tv, "patient_id"].to_numpy(), val_fraction, seed)
    table.loc[tv & table["patient_id"].isin(val_patients), "split"] = "val"
    labels = labels_matrix(table["labels_text"].tolist(), rows=table["image"].tolist())
    return NIHIndex(
        root=root,
        labels_file=labels_file,
        frame=table,
        labels=labels,
        n_label_rows=n_rows,
        missing=missing,
        val_fraction=val_fraction,
        seed=seed,
    )
