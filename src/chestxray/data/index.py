"""The NIH ChestX-ray14 index: labels file, image locations, official and validation splits.

Works on the dataset as it ships: `Data_Entry_2017.csv` (first release, trailing empty
column) or `Data_Entry_2017_v2020.csv` (plain or .gz), images anywhere below the root
(`images_001/images/...` from Kaggle, `images/` from the NIH archive), and the official
`train_val_list.txt` / `test_list.txt`. Validation is carved from train_val by patient.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chestxray.data.common import DatasetIndex
from chestxray.data.images import IMAGE_SUFFIXES
from chestxray.errors import DatasetError
from chestxray.labels import FINDINGS, labels_matrix

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# Preference order when a root holds more than one.
LABEL_FILES = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
)
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
SPLITS = ("train", "val", "test")
ALL_SPLITS = (*SPLITS, "all")  # what split_positions takes
TUNING_SPLITS = ("val", "train")  # where thresholds may be tuned: never the test split
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")


def find_labels_file(root: Path) -> Path:
    """The root's labels CSV (2020 revision preferred over the first release)."""
    for name in LABEL_FILES:
        candidate = root / name
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{root}: no labels file found; expected one of {', '.join(LABEL_FILES)} in the root")


PANDAS_HINT = "reading a dataset root needs pandas, which is not installed: pip install 'chestxray[data]'"


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise DatasetError(PANDAS_HINT) from None
    return pandas


def read_labels_table(path: Path) -> "pd.DataFrame":
    """Read the labels CSV into a DataFrame with columns image, labels_text, patient_id
    (plus view, age, sex when present) and `line`, the CSV line number of each row."""
    pd = _pandas()

    try:
        # index_col=False: the first release ends every line with a comma; without it a
        # header shorter than the rows would silently turn "Image Index" into the index.
        with warnings.catch_warnings():  # "header shorter than data": that trailing empty field
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except Exception as exc:  # pandas raises many parser error types
        raise DatasetError(f"{path}: cannot parse labels file ({exc})") from None
    # The first release's trailing comma makes an unnamed empty column; drop such columns.
    frame = frame.loc[:, [c for c in frame.columns if not str(c).startswith("Unnamed")]]
    frame.columns = [str(c).strip() for c in frame.columns]
    for col in REQUIRED_COLUMNS:
        if col not in frame.columns:
            raise DatasetError(f"{path}: missing column {col!r}; found {list(frame.columns)}")
    out = pd.DataFrame(
        {
            "image": frame["Image Index"].str.strip(),
            "labels_text": frame["Finding Labels"].str.strip(),
            "patient_id": frame["Patient ID"].str.strip().map(_patient_key),
            "line": np.arange(2, len(frame) + 2),  # line 1 is the header
        }
    )
    for optional, name in (("View Position", "view"), ("Patient Age", "age"), ("Patient Gender", "sex")):
        if optional in frame.columns:
            out[name] = frame[optional].str.strip()
    for col, what in (("image", "Image Index"), ("patient_id", "Patient ID")):
        empty = out[col] == ""
        if empty.any():
            raise DatasetError(f"{path} line {int(out['line'][empty].iloc[0])}: empty {what!r}")
    dupes = out["image"].duplicated()
    if dupes.any():
        first = out[dupes].iloc[0]
        raise DatasetError(f"{path} line {int(first['line'])}: image {first['image']!r} is listed twice")
    return out


def _patient_key(value: str) -> str:
    # "00001" and "1" are the same patient (the CSV and the file names pad differently).
    return (value.lstrip("0") or "0") if value.isdigit() else value


def read_split_list(path: Path) -> list[str]:
    """The image names of an official split list, one per line. A UTF-8 byte-order mark
    (Windows editors write one) is dropped, as the CSV reader does, so that the first
    name still matches its label row."""
    if not path.is_file():
        raise DatasetError(f"{path}: official split list not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read split list ({exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def scan_images(root: Path) -> dict[str, Path]:
    """Map image file name -> path for every image below root.

    Breadth first and sorted, so the choice between duplicates is deterministic: the
    shallowest copy wins, then the first folder by name (`images/` before `originals/`).
    Hidden folders (the default cache `.chestxray-cache`) are skipped; symlinked folders
    are followed once each.
    """
    found: dict[str, Path] = {}
    queue = [root]
    seen: set[str] = set()
    head = 0
    while head < len(queue):
        folder = queue[head]
        head += 1
        try:
            real = os.path.realpath(folder)
            if real in seen:  # symlink loop or a folder linked twice
                continue
            seen.add(real)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s (%s); images there are not indexed", folder, exc.strerror or exc)
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                continue
            if is_dir:
                if not entry.name.startswith("."):
                    queue.append(Path(entry.path))
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                found.setdefault(entry.name, Path(entry.path))
    return found


def carve_validation(patients: np.ndarray | list[str], fraction: float, seed: int) -> set[str]:
    """A seeded `fraction` of the unique patients in `patients`, for validation.

    Depends only on the set of patients, the fraction and the seed (not on row order).
    At least one patient is taken when fraction > 0, and at least one is left.
    """
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"validation fraction must be in [0, 1), got {fraction}")
    unique = np.array(sorted(set(np.asarray(patients).tolist())), dtype=object)
    n_val = int(round(fraction * len(unique)))
    if fraction > 0 and len(unique) > 1:
        n_val = min(max(n_val, 1), len(unique) - 1)
    if n_val == 0:
        return set()
    chosen = np.random.default_rng(seed).permutation(len(unique))[:n_val]
    return set(unique[chosen].tolist())


@dataclass
class NIHIndex(DatasetIndex):
    """All labelled images of a dataset root, with split, patient and label matrix.

    `frame` has one row per image found (or per label row, for a metadata-only root
    opened with require_images=False): image, patient_id, labels_text, split, path
    (None where the file is missing), line (in the labels file) and, when the CSV has
    them, view, age and sex. `labels` is the N x 14 multi-hot matrix in `pathologies`
    order, row for row with `frame`.
    """

    root: Path
    labels_file: Path
    frame: Any  # pandas.DataFrame (pandas is imported lazily)
    labels: np.ndarray
    n_label_rows: int
    missing: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    seed: int = 0
    pathologies: tuple[str, ...] = FINDINGS
    unlisted: int = 0  # label rows in neither split list (left out)
    unlabelled: int = 0  # split-list names without a label row (ignored)
    skipped_missing: int = 0  # missing images dropped because allow_missing was set
    dataset = "nih"  # registry name (a class attribute, not a field)

    @property
    def images_found(self) -> int:
        return int(self.frame["path"].notna().sum())

    def summary(self) -> dict[str, Any]:
        """What `chestxray info` prints: counts, splits, prevalence, overlap."""
        frame = self.frame
        found = frame["path"].notna().to_numpy()
        out: dict[str, Any] = {
            "root": str(self.root),
            "labels_file": self.labels_file.name,
            "label_rows": self.n_label_rows,
            "unlisted_rows": self.unlisted,
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
                "images_found": int(found[pos].sum()),
                "patients": int(frame["patient_id"].iloc[pos].nunique()),
                "no_finding": round(float((lab.sum(1) == 0).mean()) if len(pos) else 0.0, 4),
                "prevalence": {
                    name: round(float(lab[:, i].mean()) if len(pos) else 0.0, 4)
                    for i, name in enumerate(self.pathologies)
                },
            }
        return out


def load_nih(
    root: str | os.PathLike[str],
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

    Validation patients are drawn from all train_val patients of the labels file, so a
    patient's split depends only on the labels file, the fraction and the seed, not on
    which images happen to be on disk.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a directory")
    _pandas()  # before any work: the index is a pandas DataFrame
    labels_file = find_labels_file(root)
    table = read_labels_table(labels_file)
    n_rows = len(table)
    # Parse every row (not only the kept ones) so a bad label is found wherever it sits.
    labels = labels_matrix(
        table["labels_text"].tolist(),
        rows=[f"{labels_file.name} line {ln} ({img})" for ln, img in zip(table["line"], table["image"])],
    )

    train_val = set(read_split_list(root / TRAIN_VAL_LIST))
    test = set(read_split_list(root / TEST_LIST))
    both = train_val & test
    if both:
        raise DatasetError(
            f"{root}: {len(both)} images are in both {TRAIN_VAL_LIST} and {TEST_LIST}, "
            f"e.g. {', '.join(sorted(both)[:3])}"
        )
    names = table["image"].tolist()
    split = np.array(["train" if n in train_val else "test" if n in test else "" for n in names], dtype=object)
    unlabelled = len((train_val | test) - set(names))
    if unlabelled:
        log.warning("%d names in the split lists have no row in %s; ignored", unlabelled, labels_file.name)
    table["split"] = split
    keep = split != ""
    unlisted = int((~keep).sum())
    if unlisted:
        log.warning("%d label rows are in neither split list; left out", unlisted)

    tv_patients = table.loc[table["split"] == "train", "patient_id"].to_numpy()
    val_patients = carve_validation(tv_patients, val_fraction, seed)
    table.loc[(table["split"] == "train") & table["patient_id"].isin(val_patients), "split"] = "val"

    found = scan_images(root)
    table["path"] = [str(found[n]) if n in found else None for n in names]
    has_file = table["path"].notna().to_numpy()
    missing = table.loc[keep & ~has_file, "image"].tolist()
    skipped = 0
    if missing and require_images:
        if not allow_missing:
            raise DatasetError(
                f"{root}: {len(missing):,} of {int(keep.sum()):,} listed images are missing, e.g. "
                f"{', '.join(missing[:5])}; allow missing images (allow_missing=True) to use the "
                f"{int(keep.sum()) - len(missing):,} present"
            )
        skipped = len(missing)
        log.warning(
            "%d listed images are missing under %s; skipped them and using the %d present",
            skipped,
            root,
            int(keep.sum()) - skipped,
        )
        keep = keep & has_file

    table = table.loc[keep].reset_index(drop=True)
    return NIHIndex(
        root=root,
        labels_file=labels_file,
        frame=table,
        labels=labels[keep],
        n_label_rows=n_rows,
        missing=missing,
        val_fraction=val_fraction,
        seed=seed,
        unlisted=unlisted,
        unlabelled=unlabelled,
        skipped_missing=skipped,
    )
