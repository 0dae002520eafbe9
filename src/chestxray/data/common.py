"""The common index every dataset reader produces, and helpers the readers share.

One row per image: `image` (a key unique within the dataset: the file name for NIH, the
path relative to the dataset root elsewhere), `path` (None where the file is missing),
`patient_id`, `study_id` (None where the dataset has none), `view` ("PA", "AP",
"LATERAL" or "UNKNOWN"), `frontal` (True / False / None), `sex` ("M", "F" or None),
`age` (years, float, NaN when unknown), `split` ("train", "val", "test").
`labels` is an N x L float32 matrix over the dataset's *own* label names
(`pathologies`) with three states: 1 positive, 0 negative, NaN unknown.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.errors import DatasetError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VIEWS = ("PA", "AP", "LATERAL", "UNKNOWN")
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
FRONTAL = "frontal"


@dataclass(frozen=True)
class DatasetOptions:
    """What a user can set about how a root is read (the shared dataset flags)."""

    val_fraction: float = 0.1
    seed: int = 0
    test_fraction: float = 0.2  # only for datasets without an official test split
    allow_missing: bool = False
    require_images: bool = True
    uncertain: str = "ignore"  # CheXpert / MIMIC -1: ignore (masked) | ones | zeros
    vindr_rule: str = "any"  # VinDr image label from its 3 readers: any | majority
    csv_spec: str | None = None  # JSON/YAML column spec for the csv reader
    csv_columns: str | None = None  # the same as flags: "path=file,labels=findings,patient=pid"
    views: str | None = None  # None: all rows; "frontal"; or "PA,AP,..."
    allow_outside_root: bool = False  # csv: image and label files outside the dataset's folder


class DatasetIndex:
    """Behaviour shared by every index (NIH's `NIHIndex` and `TableIndex`)."""

    dataset: str
    root: Path
    frame: Any  # pandas.DataFrame
    labels: np.ndarray
    pathologies: tuple[str, ...]
    skipped_missing: int

    def __len__(self) -> int:
        return len(self.frame)

    def split_positions(self, split: str) -> np.ndarray:
        """Row positions (into frame / labels) of one split: train, val, test or all."""
        if split == "all":
            return np.arange(len(self.frame))
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or 'all'")
        return np.flatnonzero(self.frame["split"].to_numpy() == split)

    def labelled_mask(self) -> np.ndarray:
        """Rows `evaluate` can score: an image file and at least one known label."""
        labels = np.asarray(self.labels, dtype=np.float64)
        known = ~np.isnan(labels).all(axis=1) if labels.ndim == 2 and labels.shape[1] else np.zeros(len(labels), bool)
        return known & self.frame["path"].notna().to_numpy()

    def labelled_counts(self) -> dict[str, int]:
        """Labelled images with a file in each split and in all of them ("all")."""
        mask = self.labelled_mask()
        return {s: int(mask[self.split_positions(s)].sum()) for s in (*SPLITS, "all")}

    def patient_overlap(self) -> dict[str, int]:
        """Number of patients shared by each pair of splits (all zero when sound)."""
        groups = {s: set(self.frame.loc[self.frame["split"] == s, "patient_id"]) for s in SPLITS}
        return {f"{a}-{b}": len(groups[a] & groups[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :]}

    def iter_paths(self) -> Iterator[tuple[str, Path]]:
        """(image key, path) of every row whose file was found, in frame order."""
        for name, path in zip(self.frame["image"], self.frame["path"]):
            if isinstance(path, str):
                yield name, Path(path)


@dataclass
class TableIndex(DatasetIndex):
    """The index of a non-NIH dataset. `raw` keeps the file's states before the uncertainty
    policy (1, 0, -1 uncertain, NaN not mentioned) so `info` can count them."""

    dataset: str
    root: Path
    labels_file: Path
    frame: Any
    raw: np.ndarray
    labels: np.ndarray
    pathologies: tuple[str, ...]
    split_source: str = ""
    notes: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)  # optional files of the layout not found
    missing: list[str] = field(default_factory=list)  # images listed but absent
    filled_negative: np.ndarray | None = None  # per label: blanks made negative by a rule
    uncertain: str = "ignore"
    skipped_missing: int = 0
    n_label_rows: int = 0

    @property
    def images_found(self) -> int:
        return int(self.frame["path"].notna().sum())

    def select(self, mask: np.ndarray) -> "TableIndex":
        """A copy holding only the rows where `mask` is true."""
        mask = np.asarray(mask, dtype=bool)
        return replace(
            self,
            frame=self.frame.loc[mask].reset_index(drop=True),
            raw=self.raw[mask],
            labels=self.labels[mask],
        )

    def summary(self) -> dict[str, Any]:
        """What `chestxray info` prints for this dataset: counts, views, splits, label states."""
        frame = self.frame
        found = frame["path"].notna().to_numpy()
        views = frame["view"].value_counts().to_dict()
        frontal = frame["frontal"]
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "root": str(self.root),
            "labels_file": str(self.labels_file.relative_to(self.root))
            if self.labels_file.is_relative_to(self.root)
            else str(self.labels_file),
            "label_rows": self.n_label_rows or len(frame),
            "rows": len(frame),
            "images_found": int(found.sum()),
            "images_missing": len(self.missing) if self.missing else int((~found).sum()),
            "missing_examples": (self.missing or frame.loc[~found, "image"].head(5).tolist())[:5],
            "missing_files": list(self.missing_files),
            "notes": list(self.notes),
            "patients": int(frame["patient_id"].nunique()),
            "studies": int(frame["study_id"].nunique()) if frame["study_id"].notna().any() else None,
            "views": {
                "frontal": int((frontal == True).sum()),  # noqa: E712 (object column with None)
                "lateral": int((frontal == False).sum()),  # noqa: E712
                **{v: int(views.get(v, 0)) for v in VIEWS},
            },
            "split_source": self.split_source,
            "labelled": self.labelled_counts(),
            "uncertain_policy": self.uncertain,
            "splits": {},
            "labels": {},
            "patient_overlap": self.patient_overlap(),
        }
        for split in SPLITS:
            pos = self.split_positions(split)
            out["splits"][split] = {
                "images": int(len(pos)),
                "images_found": int(found[pos].sum()),
                "patients": int(frame["patient_id"].iloc[pos].nunique()),
            }
        raw = self.raw
        for i, name in enumerate(self.pathologies):
            col = raw[:, i]
            entry = {
                "positive": int((col == 1).sum()),
                "negative": int((col == 0).sum()),
                "uncertain": int((col == -1).sum()),
                "unlabelled": int(np.isnan(col).sum()),
            }
            if self.filled_negative is not None:
                entry["blank_as_negative"] = int(self.filled_negative[i])
            out["labels"][name] = entry
        return out


# ---- helpers for readers ---------------------------------------------------------------


def find_file(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of `names` (each also tried with .gz) present in `folder`."""
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_csv(path: Path, **kwargs: Any) -> Any:
    """pandas.read_csv (plain or .gz) with a one-line error naming the file."""
    import pandas as pd

    try:
        return pd.read_csv(path, **kwargs)
    except Exception as exc:  # pandas raises many parser error types
        reason = " ".join(str(exc).split())  # pandas' C parser messages end in a newline
        raise DatasetError(f"{path}: cannot parse ({type(exc).__name__}: {reason[:300]})") from None


def require_columns(frame: Any, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")


def normalise_view(values: Sequence[Any]) -> np.ndarray:
    """Dataset view strings -> PA / AP / LATERAL / UNKNOWN."""
    table = {
        "PA": "PA",
        "AP": "AP",
        "AP SUPINE": "AP",
        "AP_HORIZONTAL": "AP",
        "AP AXIAL": "AP",
        "LATERAL": "LATERAL",
        "LL": "LATERAL",
        "RL": "LATERAL",
        "L": "LATERAL",
        "LAT": "LATERAL",
    }
    return np.array([table.get(str(v).strip().upper(), "UNKNOWN") if v == v else "UNKNOWN" for v in values], object)


def frontal_from_view(views: np.ndarray) -> np.ndarray:
    """True for PA/AP, False for lateral, None where unknown."""
    return np.array([True if v in ("PA", "AP") else False if v == "LATERAL" else None for v in views], dtype=object)


def normalise_sex(values: Sequence[Any]) -> np.ndarray:
    table = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}
    return np.array([table.get(str(v).strip().upper()) if v == v else None for v in values], dtype=object)


def to_age(values: Sequence[Any]) -> np.ndarray:
    """Ages in years as floats (NaN where unknown); NIH's first release writes '058Y'."""
    import pandas as pd

    text = pd.Series(list(values), dtype=object).astype(str).str.strip().str.rstrip("Yy")
    return pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)


def locate_images(root: Path, relative: Sequence[str]) -> list[str | None]:
    """Absolute path of each relative image path that exists, else None. Folders are listed
    once each (memoised), and a top folder that is absent (a metadata-only root) settles all
    its rows at once, so 200k rows cost a few stats there."""
    base = str(root)
    out: list[str | None] = [None] * len(relative)
    heads: dict[str, bool] = {}
    listing: dict[str, set[str] | None] = {}

    def entries(folder: str) -> set[str] | None:
        if folder not in listing:
            try:
                listing[folder] = set(os.listdir(os.path.join(base, folder)))
            except OSError:
                listing[folder] = None
        return listing[folder]

    for k, rel in enumerate(relative):
        folder, _, name = rel.rpartition("/")
        head = "/".join(folder.split("/", 2)[:2])
        present = heads.get(head)
        if present is None:
            present = heads[head] = os.path.isdir(os.path.join(base, head))
        if not present:
            continue
        names = entries(folder)
        if names is not None and name in names:
            out[k] = os.path.join(base, rel)
    return out


def apply_uncertain(raw: np.ndarray, policy: str) -> np.ndarray:
    """The label matrix from raw states: -1 (uncertain) becomes NaN, 1 or 0 by policy."""
    if policy not in UNCERTAIN_POLICIES:
        raise DatasetError(f"unknown uncertainty policy {policy!r}; choose {', '.join(UNCERTAIN_POLICIES)}")
    labels = raw.astype(np.float32, copy=True)
    labels[labels == -1] = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[policy]
    return labels


def missing_advice(present: int) -> str:
    """The end of a missing-images error: with none present, allowing missing images cannot help."""
    if present == 0:
        return "none of them is there: check that the root is the dataset's folder and its images are unpacked"
    return f"allow missing images (allow_missing=True) to use the {present:,} present"


def check_images(dataset: str, root: Path, frame: Any, opts: DatasetOptions) -> tuple[np.ndarray, list[str]]:
    """Keep-mask and names of missing images; an error (naming the expected file) when images
    are required, some are missing and --allow-missing is not set."""
    has = frame["path"].notna().to_numpy()
    missing = frame.loc[~has, "image"].tolist()
    keep = np.ones(len(frame), dtype=bool)
    if missing and opts.require_images:
        if not opts.allow_missing:
            first = frame.loc[~has].iloc[0]
            raise DatasetError(
                f"{dataset}:{root}: {len(missing):,} of {len(frame):,} listed images are missing, e.g. "
                f"expected {root / str(first['relpath'])}; {missing_advice(int(has.sum()))}"
            )
        log.warning("%d listed images are missing under %s; skipped them", len(missing), root)
        keep = has
    return keep, missing


def finish_index(index: TableIndex, base: Path, opts: DatasetOptions) -> TableIndex:
    """The tail every table reader shares: find each row's image under `base` (relpath), apply
    the missing-image policy, and drop the rows without an image where that is allowed."""
    index.frame["path"] = locate_images(base, index.frame["relpath"].tolist())
    keep, index.missing = check_images(index.dataset, base, index.frame, opts)
    if not keep.all():
        index = index.select(keep)
        index.skipped_missing = int((~keep).sum())
    return index


def filter_views(index: DatasetIndex, views: str | None) -> DatasetIndex:
    """Rows of the chosen views: None or 'all' keeps everything; 'frontal' drops rows known
    to be lateral; 'PA,AP' keeps exactly those views."""
    if views is None or views.strip().lower() == "all":
        return index
    frame = index.frame
    if views.strip().lower() == FRONTAL:
        if "frontal" not in frame.columns:
            return index
        mask = (frame["frontal"] != False).to_numpy()  # noqa: E712 (None = unknown, kept)
    else:
        wanted = [v.strip().upper() for v in views.split(",") if v.strip()]
        wanted = ["LATERAL" if v in ("L", "LAT", "LL", "RL") else v for v in wanted]
        bad = [v for v in wanted if v not in VIEWS]
        if bad:
            raise DatasetError(f"views={bad[0]!r}: unknown view; choose from {', '.join(VIEWS)}, 'frontal' or 'all'")
        mask = frame["view"].isin(wanted).to_numpy()
    if mask.all():
        return index
    if isinstance(index, TableIndex):
        return index.select(mask)
    # NIHIndex: a copy with the same fields, fewer rows.
    return replace(index, frame=frame.loc[mask].reset_index(drop=True), labels=index.labels[mask])  # type: ignore[type-var]
