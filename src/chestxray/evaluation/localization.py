"""How well Grad-CAM maps point at the radiologists' boxes of `BBox_List_2017.csv`.

Two scores per box, each next to the same score of a random map:

* pointing game: a hit when the map's maximum lies inside the box (a map with no
  positive value points nowhere, a miss);
* the Wang et al. (CVPR 2017) protocol: the map (ReLU'd, divided by its maximum) is
  thresholded at `threshold` (0.5 by default: Wang et al. used 60 and 180 of 255, i.e.
  0.24 and 0.71; 0.5 is the middle ground), a box is drawn around every 8-connected
  region, and a ground-truth box counts as found at T(IoBB) when any drawn box reaches
  IoBB >= T, where IoBB = intersection / area of the drawn box. Reported at
  T = 0.1, 0.25 and 0.5.

The random baseline draws uniform noise on the CAM's own grid (the target layer's
h x w) and upsamples it like a CAM, so it is exactly as blobby as the maps it is
compared with; each box is scored on `random_draws` draws (seeded) and averaged.

Boxes are given in the 1024 x 1024 pixel frame of the NIH originals and are scaled to
each image's actual size. The pure scoring functions take hand-made maps and boxes.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.errors import DatasetError, ImageReadError, LabelError
from chestxray.labels import canonical_finding

if TYPE_CHECKING:
    from chestxray.data.common import DatasetIndex
    from chestxray.inference.predict import Analyzer

BOX_FRAME = 1024  # NIH box coordinates refer to the 1024 x 1024 originals
IOBB_THRESHOLDS = (0.1, 0.25, 0.5)
DEFAULT_THRESHOLD = 0.5
DEFAULT_RANDOM_DRAWS = 10


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in pixel-edge coordinates: covers [x, x + w) x [y, y + h)."""

    x: float
    y: float
    w: float
    h: float

    @property
    def area(self) -> float:
        return max(self.w, 0.0) * max(self.h, 0.0)

    def scaled(self, sx: float, sy: float) -> "Box":
        return Box(self.x * sx, self.y * sy, self.w * sx, self.h * sy)

    def intersection(self, other: "Box") -> float:
        iw = min(self.x + self.w, other.x + other.w) - max(self.x, other.x)
        ih = min(self.y + self.h, other.y + other.h) - max(self.y, other.y)
        return max(iw, 0.0) * max(ih, 0.0)

    def contains_pixel(self, row: int, col: int) -> bool:
        """Whether the centre of pixel (row, col) lies in the box."""
        cx, cy = col + 0.5, row + 0.5
        return self.x <= cx <= self.x + self.w and self.y <= cy <= self.y + self.h


@dataclass(frozen=True)
class BoxEntry:
    image: str
    finding: str
    box: Box  # in the 1024-px frame


def read_boxes(path: str | os.PathLike) -> list[BoxEntry]:
    """Rows of BBox_List_2017.csv: image, finding (package spelling), box.

    Accepts the file as NIH ships it (header `Image Index,Finding Label,Bbox [x,y,w,h],,,`
    with trailing empty columns; "Infiltrate" for Infiltration) and plainer variants.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read the box list ({exc.strerror or exc})") from None
    out: list[BoxEntry] = []
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if lineno == 1 and cells[0].lower().startswith("image"):
            continue  # header
        if len(cells) < 6 or not all(cells[:6]):
            raise DatasetError(f"{p}: line {lineno}: expected image, finding, x, y, w, h; got {row}")
        try:
            finding = canonical_finding(cells[1])
        except LabelError as exc:
            raise DatasetError(f"{p}: line {lineno}: {exc}") from None
        try:
            x, y, w, h = (float(v) for v in cells[2:6])
        except ValueError:
            raise DatasetError(f"{p}: line {lineno}: box coordinates are not numbers: {cells[2:6]}") from None
        if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            raise DatasetError(f"{p}: line {lineno}: box needs finite coordinates and positive size: {cells[2:6]}")
        out.append(BoxEntry(cells[0], finding, Box(x, y, w, h)))
    return out


def vindr_box_entries(root: str | os.PathLike) -> list[BoxEntry]:
    """VinDr-CXR radiologist boxes (train.csv, original pixel coordinates), one per reader and
    box, under the common vocabulary's finding names (`data.harmonise`); unmapped classes
    (Other lesion) are left out."""
    from chestxray.data.datasets.vindr import NO_FINDING, read_vindr_rows
    from chestxray.data.harmonise import mapping_for

    _, rows = read_vindr_rows(Path(root))
    boxed = rows[(rows["class_name"] != NO_FINDING)].dropna(subset=["x_min", "y_min", "x_max", "y_max"])
    names = mapping_for("vindr", sorted(set(boxed["class_name"])))
    out = []
    for image, cls, x0, y0, x1, y1 in boxed[["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"]].itertuples(
        index=False
    ):
        finding = names.get(cls)
        if finding is not None and x1 > x0 and y1 > y0:
            out.append(BoxEntry(str(image), finding, Box(float(x0), float(y0), float(x1 - x0), float(y1 - y0))))
    return out


# ---- pure scoring on maps and boxes -------------------------------------------------


def peak_pixel(heatmap: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the map's maximum, None when no value is positive. Ties (the flat
    plateaus an upsampled coarse map has at its borders) go to the tied pixel nearest
    the centroid of the tied pixels, not to the first one in memory order."""
    m = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0)
    top = float(m.max()) if m.size else 0.0
    if not top > 0.0:
        return None
    rows, cols = np.nonzero(m >= top * (1.0 - 1e-6))
    d2 = (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2
    k = int(np.argmin(d2))
    return int(rows[k]), int(cols[k])


def pointing_hit(heatmap: np.ndarray, box: Box) -> bool:
    """Pointing game: the map's maximum (see `peak_pixel`) lies in the box.
    A map without any positive value points nowhere: a miss."""
    peak = peak_pixel(heatmap)
    return peak is not None and box.contains_pixel(*peak)


def map_boxes(heatmap: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[Box]:
    """Boxes around the 8-connected regions where map / max(map) >= threshold."""
    from scipy import ndimage

    m = np.maximum(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0.0)
    top = float(m.max()) if m.size else 0.0
    if top <= 0.0:
        return []
    labelled, count = ndimage.label(m / top >= threshold, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for sl in ndimage.find_objects(labelled)[:count]:
        if sl is None:
            continue
        rows, cols = sl
        boxes.append(
            Box(float(cols.start), float(rows.start), float(cols.stop - cols.start), float(rows.stop - rows.start))
        )
    return boxes


def iobb(predicted: Box, truth: Box) -> float:
    """Intersection over the predicted box's area (Wang et al. 2017)."""
    area = predicted.area
    return predicted.intersection(truth) / area if area > 0 else 0.0


def score_map(
    heatmap: np.ndarray,
    truth: Box,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    iobb_thresholds: Sequence[float] = IOBB_THRESHOLDS,
) -> dict[str, float]:
    """{"pointing": 0/1, "iobb@T": 0/1 for each T} for one map and one true box
    (`truth` in the map's pixel frame)."""
    best = max((iobb(b, truth) for b in map_boxes(heatmap, threshold)), default=0.0)
    out = {"pointing": float(pointing_hit(heatmap, truth))}
    for t in iobb_thresholds:
        out[metric_name(t)] = float(best >= t)
    return out


def metric_name(t: float) -> str:
    return f"iobb@{t:g}"


def random_map(shape: tuple[int, int], grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Uniform noise on a `grid` (h, w), upsampled to `shape` like a CAM."""
    from chestxray.inference.explain import upsample_map

    return upsample_map(rng.random((int(grid[0]), int(grid[1])), dtype=np.float32), shape)


def summarise(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each score over boxes (hit rates)."""
    if not scores:
        return {}
    keys = list(scores[0])
    return {k: round(float(np.mean([s[k] for s in scores])), 4) for k in keys}


# ---- the protocol over a dataset -------------------------------------------------------


def score_localization(
    analyzer: "Analyzer",
    index: "DatasetIndex",
    boxes_csv: str | os.PathLike,
    split: str | None = None,
    seed: int = 0,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    iobb_thresholds: Sequence[float] = IOBB_THRESHOLDS,
    random_draws: int = DEFAULT_RANDOM_DRAWS,
    progress: bool = False,
    entries: list[BoxEntry] | None = None,
    box_frame: int | None = BOX_FRAME,
) -> dict[str, Any]:
    """Grad-CAM localization scores of `analyzer` on the boxed images of `index`
    (one `split`, or all when None), next to a seeded random-map baseline. JSON-able.
    `entries` replaces the CSV's boxes (another dataset's); `box_frame` None means boxes are
    in each image's own pixel frame (VinDr) rather than NIH's 1024 px."""
    from tqdm.auto import tqdm

    from chestxray.inference.explain import gradcam

    if not 0.0 < threshold <= 1.0:
        raise DatasetError(f"localization threshold must lie in (0, 1], got {threshold}")
    entries = read_boxes(boxes_csv) if entries is None else entries
    frame = index.frame
    positions = index.split_positions(split) if split is not None else np.arange(len(frame))
    paths = {str(frame["image"].iloc[i]): frame["path"].iloc[i] for i in positions if frame["path"].iloc[i] is not None}
    by_image: dict[str, list[BoxEntry]] = defaultdict(list)
    for e in entries:
        if e.image in paths:
            by_image[e.image].append(e)
    known = set(analyzer.labels)
    rng = np.random.default_rng(seed)
    cam_scores: dict[str, list[dict[str, float]]] = defaultdict(list)
    rand_scores: dict[str, list[dict[str, float]]] = defaultdict(list)
    unreadable = 0
    scored_images = 0
    unscored_findings: set[str] = set()
    grid: tuple[int, int] | None = None
    model = analyzer.model  # ChestXrayError for a backend without a torch model
    for image in tqdm(sorted(by_image), desc="localization", unit="img", disable=not progress):
        boxes = [e for e in by_image[image] if e.finding in known]
        unscored_findings.update(e.finding for e in by_image[image] if e.finding not in known)
        if not boxes:
            continue
        try:
            gray, x = analyzer.preprocess(paths[image], image)
        except ImageReadError:
            unreadable += 1
            continue
        findings = list(dict.fromkeys(e.finding for e in boxes))
        run = gradcam(model, x, [analyzer.labels.index(f) for f in findings], gray.shape[:2])
        grid = run.grid
        scored_images += 1
        maps = dict(zip(findings, run.maps))
        sy, sx = (gray.shape[0] / box_frame, gray.shape[1] / box_frame) if box_frame else (1.0, 1.0)
        for e in boxes:
            truth = e.box.scaled(sx, sy)
            cam_scores[e.finding].append(
                score_map(maps[e.finding], truth, threshold=threshold, iobb_thresholds=iobb_thresholds)
            )
            draws = [
                score_map(
                    random_map(gray.shape[:2], run.grid, rng),
                    truth,
                    threshold=threshold,
                    iobb_thresholds=iobb_thresholds,
                )
                for _ in range(random_draws)
            ]
            rand_scores[e.finding].append(summarise(draws))

    per_finding = {
        f: {"boxes": len(cam_scores[f]), "cam": summarise(cam_scores[f]), "random": summarise(rand_scores[f])}
        for f in analyzer.labels
        if cam_scores.get(f)
    }
    all_cam = [s for f in per_finding for s in cam_scores[f]]
    all_rand = [s for f in per_finding for s in rand_scores[f]]
    return {
        "model": analyzer.name,
        "boxes_file": Path(boxes_csv).name,
        "split": split or "all",
        "images": scored_images,
        "boxes": len(all_cam),
        "unreadable_images": unreadable,
        "unscored_findings": sorted(unscored_findings),
        "method": {
            "cam": "Grad-CAM of each boxed finding's logit at the model's last convolutional block",
            "threshold": threshold,
            "iobb_thresholds": list(iobb_thresholds),
            "connectivity": 8,
            "pointing": "maximum of the map inside the box",
            "box_frame": box_frame or "image pixels",
            "random": {
                "kind": "uniform noise on the CAM grid, bilinear upsampled",
                "grid": list(grid) if grid else None,
                "draws": random_draws,
                "seed": seed,
            },
        },
        "overall": {"boxes": len(all_cam), "cam": summarise(all_cam), "random": summarise(all_rand)},
        "per_finding": per_finding,
        "note": NOT_FOR_CLINICAL_USE,
    }


def localization_markdown(result: dict[str, Any]) -> str:
    """A Markdown section for an evaluation report."""
    method = result["method"]
    ts = method["iobb_thresholds"]
    lines = [
        "## Localization (Grad-CAM vs radiologist boxes)",
        "",
        f"Model `{result['model']}`, {result['boxes']} boxes on {result['images']} images "
        f"({'all splits' if result['split'] == 'all' else result['split'] + ' split'}) "
        f"from `{result['boxes_file']}`.",
        "",
    ]
    if not result["boxes"]:
        lines.append("No image of this split has a box for a finding of the model; nothing was scored.")
        lines += ["", f"_{result['note']}_", ""]
        return "\n".join(lines)
    lines += [
        "Each cell: Grad-CAM hit rate / random-map hit rate. Pointing: the map's maximum falls in the "
        f"box. T(IoBB): the map, divided by its maximum, is thresholded at {method['threshold']:g}; a box "
        "is drawn around each 8-connected region, and a true box is found when a drawn box has "
        "intersection / own area >= T (Wang et al., CVPR 2017). Random: uniform noise on the "
        f"{'x'.join(map(str, method['random']['grid'] or []))} CAM grid, upsampled, "
        f"{method['random']['draws']} draws per box (seed {method['random']['seed']}).",
        "",
        "| finding | boxes | pointing | " + " | ".join(f"T(IoBB) {t:g}" for t in ts) + " |",
        "|---|---:|---:|" + "---:|" * len(ts),
    ]
    keys = ["pointing"] + [metric_name(t) for t in ts]

    def row(name: str, block: dict[str, Any]) -> str:
        cells = [f"{block['cam'][k]:.2f} / {block['random'][k]:.2f}" for k in keys]
        return f"| {name} | {block['boxes']} | " + " | ".join(cells) + " |"

    for finding, block in result["per_finding"].items():
        lines.append(row(finding, block))
    lines.append(row("**all boxes**", result["overall"]))
    if result.get("unreadable_images"):
        lines += ["", f"{result['unreadable_images']} boxed images could not be read and were skipped."]
    if result.get("unscored_findings"):
        lines += [
            "",
            f"Boxes of findings the model does not predict were skipped: {', '.join(result['unscored_findings'])}.",
        ]
    lines += ["", f"_{result['note']}_", ""]
    return "\n".join(lines)
