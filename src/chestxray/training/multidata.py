"""Training data from one or several dataset roots (`nih:/a chexpert:/b`): each root's own
split and prepared cache, targets over one label set (harmonised, NaN where a dataset does
not label a finding), and per-dataset validation parts."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestxray.data.cache import PreparedCache, default_cache_dir, prepare_cache
from chestxray.data.common import DatasetIndex, DatasetOptions
from chestxray.data.datasets import open_dataset, parse_root
from chestxray.data.harmonise import VOCABULARY, harmonise, targets_for
from chestxray.data.loader import MemmapImages, choose_loader
from chestxray.errors import ChestXrayError
from chestxray.training.distributed import DistInfo, barrier

log = logging.getLogger(__name__)


@dataclass
class Part:
    spec: str  # NAME:PATH as given
    index: DatasetIndex
    cache: PreparedCache
    targets: np.ndarray  # rows of index x model labels, NaN = unknown
    sources: dict[str, list[str]]  # model label -> own names it comes from


@dataclass
class SplitData:
    images: Any  # uint8 (N, S, S) array in RAM, or MemmapImages
    targets: np.ndarray  # (N, L) float32 with NaN
    groups: np.ndarray  # patient ids, prefixed by dataset when several
    sources: np.ndarray  # the spec of each row's dataset


def root_list(root: str | list[str]) -> list[str]:
    return [root] if isinstance(root, str) else list(root)


def options_of(cfg: Any) -> DatasetOptions:
    return DatasetOptions(
        val_fraction=cfg.val_fraction,
        seed=cfg.split_seed,
        test_fraction=getattr(cfg, "test_fraction", 0.2),
        allow_missing=cfg.allow_missing,
        uncertain=getattr(cfg, "uncertain", "ignore"),
        vindr_rule=getattr(cfg, "vindr_rule", "any"),
        csv_spec=getattr(cfg, "csv_spec", None),
        csv_columns=getattr(cfg, "csv_columns", None),
        allow_outside_root=getattr(cfg, "allow_outside_root", False),
        views=getattr(cfg, "views", None) or "frontal",
    )


def cache_dir_for(cfg: Any, spec: str, several: bool) -> Path:
    root = parse_root(spec)[1]
    if cfg.cache and not several:
        return Path(cfg.cache)
    if cfg.cache:
        return Path(cfg.cache) / default_cache_dir(root).name  # one sub-folder per root
    return default_cache_dir(root)


def choose_labels(indexes: list[DatasetIndex], wanted: str | None) -> list[str]:
    """--labels (comma-separated vocabulary names), else every finding the data labels."""
    if wanted:
        names = [w.strip() for w in wanted.split(",") if w.strip()]
        unknown = [n for n in names if n not in VOCABULARY]
        if unknown:
            raise ChestXrayError(
                f"labels={wanted!r}: unknown finding {unknown[0]!r}; see `chestxray datasets` for the names"
            )
        return names
    present: set[str] = set()
    for index in indexes:
        findings, matrix, _ = harmonise(index.dataset, index.pathologies, index.labels)
        present.update(f for j, f in enumerate(findings) if np.isfinite(matrix[:, j]).any())
    return [f for f in VOCABULARY if f in present]


def cache_crop(cfg: Any) -> str:
    """The framing the trained model will predict with, which its cache must match: an --init
    bundle's crop (torchxrayvision imports centre-crop), else whole images."""
    init = getattr(cfg, "init", None)
    if not init:
        return "none"
    from chestxray.models.bundle import read_bundle_meta

    return read_bundle_meta(init).preprocessing.crop


def load_parts(cfg: Any, info: DistInfo) -> tuple[list[Part], list[str]]:
    specs = root_list(cfg.root)
    crop = cache_crop(cfg)
    opts = options_of(cfg)
    indexes = [open_dataset(spec, opts) for spec in specs]
    labels = choose_labels(indexes, getattr(cfg, "labels", None))
    parts = []
    for spec, index in zip(specs, indexes):
        cache_dir = cache_dir_for(cfg, spec, len(specs) > 1)
        names = index.frame["image"].tolist()

        def ready(cache_dir: Path = cache_dir, names: list[str] = names) -> bool:
            try:
                cache = PreparedCache.open(cache_dir, cfg.image_size, crop)
            except ChestXrayError:
                return False
            return cache.names == names and bool(cache.done.all())

        # Only rank 0 prepares (others would race on the same files); the rest wait for it.
        if info.is_main and not ready():
            framing = " centre-cropped" if crop == "center" else ""
            log.info("preparing a %dpx%s cache of %s in %s", cfg.image_size, framing, spec, cache_dir)
            prepare_cache(
                list(index.iter_paths()),
                cache_dir,
                cfg.image_size,
                workers=cfg.workers,
                progress=sys.stderr.isatty(),
                crop=crop,
            )
        barrier(info)
        targets, sources = targets_for(index.dataset, index.pathologies, index.labels, labels)
        parts.append(Part(spec, index, PreparedCache.open(cache_dir, cfg.image_size, crop), targets, sources))
    return parts, labels


def split_data(parts: list[Part], split: str, loader: str = "auto") -> SplitData:
    """One split of every part, concatenated. Images that failed to decode at prepare time are
    left out with a warning rather than stopping the run."""
    segments, targets, groups, sources = [], [], [], []
    several = len(parts) > 1
    for part in parts:
        index, cache = part.index, part.cache
        pos = index.split_positions(split)
        names = index.frame["image"].iloc[pos].tolist()
        lookup = {n: i for i, n in enumerate(cache.names)}
        keep = np.array([n in lookup and bool(cache.done[lookup[n]]) for n in names], dtype=bool)
        if not keep.all():
            bad = [n for n, k in zip(names, keep) if not k]
            log.warning(
                "%s split of %s: %d images are not in the cache (failed to decode?), left out, e.g. %s",
                split,
                part.spec,
                len(bad),
                ", ".join(bad[:3]),
            )
        pos = pos[keep]
        rows = np.array([lookup[n] for n in np.asarray(names, dtype=object)[keep]], dtype=np.int64)
        segments.append((cache.images, rows))
        targets.append(part.targets[pos])
        patients = index.frame["patient_id"].iloc[pos].astype(str).to_numpy(dtype=object)
        groups.append(np.array([f"{part.spec}|{p}" for p in patients], dtype=object) if several else patients)
        sources.append(np.full(len(pos), part.spec, dtype=object))
    total = sum(len(r) for _, r in segments)
    if total == 0:
        raise ChestXrayError(f"the {split} split of {', '.join(p.spec for p in parts)} has no usable images")
    mapped = MemmapImages(segments)
    images = mapped.to_ram() if choose_loader(mapped.nbytes, loader) == "ram" else mapped
    return SplitData(images, np.concatenate(targets), np.concatenate(groups), np.concatenate(sources))


def dataset_label(spec: str) -> str:
    """How the bundle names a training root: its folder name, prefixed `NAME:` unless NIH."""
    name, root = parse_root(spec)
    return root.resolve().name if name == "nih" else f"{name}:{root.resolve().name}"


def describe(parts: list[Part]) -> dict[str, Any]:
    """Per-dataset facts for the bundle (no patient identifiers)."""
    out = {}
    for part in parts:
        index = part.index
        name, _ = parse_root(part.spec)
        out[dataset_label(part.spec)] = {
            "dataset": name,
            "images": {s: int(len(index.split_positions(s))) for s in ("train", "val")},
            "patients": {
                s: int(index.frame["patient_id"].iloc[index.split_positions(s)].nunique()) for s in ("train", "val")
            },
            "labels_from": part.sources,
        }
    return out
