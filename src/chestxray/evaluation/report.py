"""A visual report: random images of one split, ground truth vs prediction, with the
Grad-CAM of each image's top finding. What a notebook would show, as `grid.png`,
a self-contained `index.html` (images embedded) and `predictions.json`."""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.errors import DatasetError, ImageReadError

if TYPE_CHECKING:
    from chestxray.data.index import NIHIndex
    from chestxray.inference.explain import CamResult
    from chestxray.inference.predict import Analyzer, Prediction

THUMB = 320  # longest side of the images in the grid and the HTML page
MAX_LISTED = 5  # positives listed per tile of the grid (the HTML page lists all)


@dataclass
class ReportItem:
    image: str
    truth: list[str]
    prediction: "Prediction"
    cam: "CamResult | None"
    thumb: np.ndarray  # gray uint8
    cam_thumb: np.ndarray | None  # RGB uint8 overlay

    @property
    def predicted(self) -> list[str]:
        return [f.finding for f in self.prediction.positives]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "true": self.truth,
            "predicted": self.predicted,
            "missed": [t for t in self.truth if t not in self.predicted],
            "cam_finding": self.cam.finding if self.cam else None,
            "prediction": self.prediction.to_dict(),
        }


def choose_examples(index: "NIHIndex", split: str, n: int, seed: int) -> np.ndarray:
    """`n` seeded random row positions of `split` that have an image file (sorted)."""
    if n < 1:
        raise DatasetError(f"--n must be at least 1, got {n}")
    positions = index.split_positions(split)
    positions = positions[index.frame["path"].iloc[positions].notna().to_numpy()]
    if not len(positions):
        raise DatasetError(f"{index.root}: the {split} split has no images to show")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(positions, size=min(n, len(positions)), replace=False))


def thumbnail(array: np.ndarray, side: int = THUMB) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(array))
    img.thumbnail((side, side), Image.LANCZOS)
    return np.asarray(img)


def build_items(
    analyzer: "Analyzer", index: "NIHIndex", positions: np.ndarray, progress: bool = False
) -> list[ReportItem]:
    """One Grad-CAM pass per image: the prediction and the map of its top finding."""
    from tqdm.auto import tqdm

    from chestxray.inference.explain import CamResult, gradcam, overlay
    from chestxray.inference.predict import Prediction

    model = analyzer.model  # ChestXrayError for a backend without a torch model
    items = []
    for pos in tqdm(positions, desc="report", unit="img", disable=not progress):
        name = str(index.frame["image"].iloc[pos])
        truth = [f for f, v in zip(index.pathologies, index.labels[pos]) if v >= 0.5]
        try:
            gray, x = analyzer.preprocess(index.frame["path"].iloc[pos], name)
        except ImageReadError as exc:
            items.append(
                ReportItem(
                    name,
                    truth,
                    Prediction(name, analyzer.name, [], exc.reason),
                    None,
                    np.zeros((THUMB, THUMB), np.uint8),
                    None,
                )
            )
            continue
        run = gradcam(
            model,
            x,
            lambda probs: [int(np.argmax(probs))],
            gray.shape[:2],
            getattr(analyzer.backend, "calibrator", None),
        )
        i = run.indices[0]
        cam = CamResult(analyzer.labels[i], float(run.probabilities[i]), run.maps[0])
        prediction = Prediction(name, analyzer.name, analyzer.findings_from(run.probabilities))
        items.append(ReportItem(name, truth, prediction, cam, thumbnail(gray), thumbnail(overlay(gray, cam.heatmap))))
    return items


def _label_line(title: str, names: list[str], width: int = 44) -> str:
    return "\n".join(textwrap.wrap(f"{title}: {', '.join(names) if names else 'No Finding'}", width)) or title


def render_grid(items: list[ReportItem], model_name: str, subtitle: str) -> bytes:
    """PNG bytes of the grid: per tile the radiograph, the Grad-CAM overlay, and text."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(4, len(items))
    rows = -(-len(items) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.5 * rows + 0.7), dpi=100)
    FigureCanvasAgg(fig)
    head, body = fig.subfigures(2, 1, height_ratios=[0.7, 3.5 * rows])
    head.text(0.5, 0.5, f"{model_name}: {subtitle}\n{NOT_FOR_CLINICAL_USE}", ha="center", va="center", fontsize=11)
    subfigs = np.atleast_1d(body.subfigures(rows, cols, squeeze=False).ravel())
    for sf, item in zip(subfigs, items):
        ax_img, ax_cam = sf.subplots(1, 2)
        for ax in (ax_img, ax_cam):
            ax.set_axis_off()
        ax_img.imshow(item.thumb, cmap="gray", vmin=0, vmax=255)
        ax_img.set_title(item.image, fontsize=8)
        if item.cam_thumb is not None and item.cam is not None:
            ax_cam.imshow(item.cam_thumb)
            ax_cam.set_title(f"Grad-CAM {item.cam.finding} {item.cam.probability:.2f}", fontsize=8)
        else:
            ax_cam.text(
                0.5, 0.5, f"unreadable:\n{item.prediction.error}", ha="center", va="center", fontsize=7, wrap=True
            )
        predicted = [f"{f.finding} {f.probability:.2f}" for f in item.prediction.positives[:MAX_LISTED]]
        if len(item.prediction.positives) > MAX_LISTED:
            predicted.append(f"+{len(item.prediction.positives) - MAX_LISTED} more")
        text = _label_line("true", item.truth) + "\n" + _label_line("predicted", predicted)
        sf.text(0.5, 0.01, text, ha="center", va="bottom", fontsize=7.5, family="monospace")
        sf.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.3, wspace=0.04)
    for sf in subfigs[len(items) :]:
        sf.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _png_data_uri(array: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(items: list[ReportItem], model_name: str, subtitle: str, grid_name: str = "grid.png") -> str:
    """A self-contained page (tile images embedded; the grid linked relatively)."""
    e = html.escape
    cards = []
    for item in items:
        truth, predicted = set(item.truth), set(item.predicted)
        spans = []
        for f in item.prediction.positives:
            cls = "tp" if f.finding in truth else "fp"
            spans.append(f'<span class="{cls}">{e(f.finding)} {f.probability:.2f}</span>')
        missed = [f'<span class="fn">{e(t)}</span>' for t in item.truth if t not in predicted]
        imgs = f'<img alt="radiograph {e(item.image)}" src="{_png_data_uri(item.thumb)}">'
        if item.cam_thumb is not None and item.cam is not None:
            imgs += f'<img alt="Grad-CAM of {e(item.cam.finding)}" src="{_png_data_uri(item.cam_thumb)}">'
            cam_line = f"Grad-CAM: {e(item.cam.finding)} ({item.cam.probability:.2f})"
        else:
            cam_line = f'<span class="fp">unreadable: {e(item.prediction.error or "")}</span>'
        cards.append(
            f'<figure class="card"><div class="imgs">{imgs}</div><figcaption>'
            f"<b>{e(item.image)}</b><br>{cam_line}<br>"
            f"true: {e(', '.join(item.truth) or 'No Finding')}<br>"
            f"predicted: {' '.join(spans) or 'none'}<br>"
            f"missed: {' '.join(missed) or 'none'}</figcaption></figure>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>chestxray report: {e(model_name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
.note {{ background: #fff3cd; border: 1px solid #e0c36c; padding: .5rem .8rem; display: inline-block; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1rem; }}
.card {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }}
.imgs {{ display: flex; gap: 4px; }} .imgs img {{ width: 50%; height: auto; }}
figcaption {{ font-size: .85rem; line-height: 1.5; }}
.tp {{ color: #11772b; font-weight: 600; }} .fp {{ color: #b3261e; }} .fn {{ color: #a05a00; font-style: italic; }}
</style></head><body>
<h1>Example predictions vs ground truth</h1>
<p>Model <b>{e(model_name)}</b>. {e(subtitle)}.</p>
<p class="note"><b>{e(NOT_FOR_CLINICAL_USE)}</b></p>
<p>Predicted findings are those at or above the model's per-finding threshold:
<span class="tp">green</span> = also in the ground truth, <span class="fp">red</span> = not in it;
<span class="fn">missed</span> = true findings the model did not call. The heat map is the
Grad-CAM of each image's most probable finding (red = strongest evidence).</p>
<div class="cards">
{chr(10).join(cards)}
</div>
<h2>All tiles</h2>
<p><img src="{e(grid_name)}" alt="grid of all examples" style="max-width:100%"></p>
</body></html>
"""


def write_report(
    analyzer: "Analyzer",
    index: "NIHIndex",
    out_dir: str | Path,
    *,
    split: str = "test",
    n: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Write grid.png, index.html and predictions.json to `out_dir`; return a summary."""
    from chestxray.io import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    positions = choose_examples(index, split, n, seed)
    items = build_items(analyzer, index, positions, progress=progress)
    subtitle = f"{len(items)} random images of the {split} split (seed {seed})"
    grid = atomic_write_bytes(out / "grid.png", render_grid(items, analyzer.name, subtitle))
    page = atomic_write_text(out / "index.html", render_html(items, analyzer.name, subtitle, grid.name))
    doc = {
        "model": analyzer.name,
        "split": split,
        "seed": seed,
        "note": NOT_FOR_CLINICAL_USE,
        "images": [item.to_dict() for item in items],
    }
    data = atomic_write_text(out / "predictions.json", json.dumps(doc, indent=2) + "\n")
    return {
        "grid": str(grid),
        "html": str(page),
        "json": str(data),
        "images": len(items),
        "unreadable": sum(not item.prediction.ok for item in items),
    }
