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
    from chestxray.data.common import DatasetIndex
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
            "cam_note": self.cam.note if self.cam else None,
            "prediction": self.prediction.to_dict(),
        }


def choose_examples(index: "DatasetIndex", split: str, n: int, seed: int) -> np.ndarray:
    """`n` seeded random row positions of `split` that have an image file (sorted)."""
    if n < 1:
        raise DatasetError(f"n={n}: must be at least 1")
    positions = index.split_positions(split)
    positions = positions[index.frame["path"].iloc[positions].notna().to_numpy()]
    if not len(positions):
        raise DatasetError(f"{index.root}: the {split} split has no images to show")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(positions, size=min(n, len(positions)), replace=False))


def thumbnail(array: np.ndarray, side: int = THUMB) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(array))
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    return np.asarray(img)


def build_items(
    analyzer: "Analyzer", index: "DatasetIndex", positions: np.ndarray, progress: bool = False
) -> list[ReportItem]:
    """One Grad-CAM pass per image: the prediction and the map of its top finding. A model
    without a torch network (ONNX) gives the predictions alone: Grad-CAM needs gradients."""
    from tqdm.auto import tqdm

    from chestxray.data.harmonise import harmonise

    items = []
    for pos in tqdm(positions, desc="report", unit="img", disable=not progress):
        name = str(index.frame["image"].iloc[pos])
        findings, matrix, _ = harmonise(index.dataset, index.pathologies, index.labels[pos : pos + 1])
        truth = [f for f, v in zip(findings, matrix[0]) if v >= 0.5]  # in the model's vocabulary
        if not has_grad_cam(analyzer):
            items.append(_item_without_cam(analyzer, name, truth, index.frame["path"].iloc[pos]))
            continue
        from chestxray.inference.explain import explain_image, overlay, top_finding

        try:
            gray, prediction, cams = explain_image(
                analyzer, index.frame["path"].iloc[pos], name=name, select=top_finding
            )
        except ImageReadError as exc:
            items.append(
                ReportItem(
                    name,
                    truth,
                    analyzer.result(name, error=exc.reason),
                    None,
                    np.zeros((THUMB, THUMB), np.uint8),
                    None,
                )
            )
            continue
        cam = cams[0]
        items.append(ReportItem(name, truth, prediction, cam, thumbnail(gray), thumbnail(overlay(gray, cam.heatmap))))
    return items


def has_grad_cam(analyzer: "Analyzer") -> bool:
    """Whether the model runs in torch (Grad-CAM needs its gradients)."""
    return analyzer.backend.model is not None


def _item_without_cam(analyzer: "Analyzer", name: str, truth: list[str], path: str) -> ReportItem:
    from chestxray.data.images import read_image

    prediction = analyzer.predict_many([path], names=[name])[0]
    if not prediction.ok:
        return ReportItem(name, truth, prediction, None, np.zeros((THUMB, THUMB), np.uint8), None)
    return ReportItem(name, truth, prediction, None, thumbnail(read_image(path)), None)


NO_CAM = "no Grad-CAM: the model runs on ONNX (Grad-CAM needs the torch bundle)"

#: The HTML page's classes and their colours in the grid: true positive, false positive, missed.
CAPTION_COLOURS = {"": "#222222", "tp": "#11772b", "fp": "#b3261e", "fn": "#a05a00"}
CAPTION_WIDTH = 44  # characters per caption line in a tile


def caption_runs(item: ReportItem) -> list[list[tuple[str, str]]]:
    """A tile's caption as lines of (text, class) runs, class "" (plain), "tp", "fp" or "fn",
    with the HTML page's meaning: predicted findings green when true, red when not;
    missed true findings orange."""
    truth, predicted = set(item.truth), set(item.predicted)
    lines: list[list[tuple[str, str]]] = [[(line, "")] for line in _wrap("true", item.truth or ["No Finding"])]
    if not item.prediction.ok:
        return lines
    called = [
        (f"{f.finding} {f.probability:.2f}", "tp" if f.finding in truth else "fp") for f in item.prediction.positives
    ]
    if len(called) > MAX_LISTED:
        called = [*called[:MAX_LISTED], (f"+{len(called) - MAX_LISTED} more", "")]
    lines += _wrap_runs("predicted:", called or [("none", "")])
    missed = [(t, "fn") for t in item.truth if t not in predicted]
    lines += _wrap_runs("missed:", missed or [("none", "")])
    return lines


def _wrap(title: str, names: list[str]) -> list[str]:
    return textwrap.wrap(f"{title}: {', '.join(names)}", CAPTION_WIDTH) or [title]


def _wrap_runs(title: str, runs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    lines: list[list[tuple[str, str]]] = [[(title, "")]]
    used = len(title)
    for text, cls in runs:
        if used + 1 + len(text) > CAPTION_WIDTH and len(lines[-1]) > 1:
            lines.append([("  ", "")])
            used = 2
        lines[-1].append((text, cls))
        used += 1 + len(text)
    return lines


def grid_figure(items: list[ReportItem], model_name: str, subtitle: str) -> Any:
    """The grid as a matplotlib Figure: per tile the radiograph and its Grad-CAM overlay,
    and right under them, within the tile, the caption coloured as on the HTML page."""
    from matplotlib.artist import Artist
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.offsetbox import AnchoredOffsetbox, HPacker, TextArea, VPacker

    cols = min(4, len(items))
    rows = -(-len(items) // cols)
    tile_h = 3.9
    fig = Figure(figsize=(4.6 * cols, tile_h * rows + 0.7), dpi=100)
    FigureCanvasAgg(fig)
    parts = fig.subfigures(2, 1, height_ratios=[0.7, tile_h * rows], squeeze=False)
    head, body = parts[0, 0], parts[1, 0]
    head.text(0.5, 0.5, f"{model_name}: {subtitle}\n{NOT_FOR_CLINICAL_USE}", ha="center", va="center", fontsize=11)
    head.text(
        0.99,
        0.05,
        "predicted: green = also true, red = not true; missed: orange",
        ha="right",
        va="bottom",
        fontsize=8,
        color="#555555",
    )
    subfigs = np.atleast_1d(body.subfigures(rows, cols, squeeze=False).ravel())
    for sf, item in zip(subfigs, items):
        # Images on top; the caption hangs from the radiograph's lower edge, in the band kept
        # free below (not at the tile's bottom, where it would sit nearer the next row).
        grid = sf.add_gridspec(2, 2, height_ratios=[2.3, 1.0], left=0.02, right=0.98, top=0.93, bottom=0.02)
        grid.update(wspace=0.04, hspace=0.02)
        ax_img, ax_cam = sf.add_subplot(grid[0, 0]), sf.add_subplot(grid[0, 1])
        for ax in (ax_img, ax_cam):
            ax.set_axis_off()
        ax_img.imshow(item.thumb, cmap="gray", vmin=0, vmax=255)
        ax_img.set_title(item.image, fontsize=8)
        if item.cam_thumb is not None and item.cam is not None:
            ax_cam.imshow(item.cam_thumb)
            note = f"\n{item.cam.note}" if item.cam.note else ""
            ax_cam.set_title(f"Grad-CAM {item.cam.finding} {item.cam.probability:.2f}{note}", fontsize=8)
        else:
            text = f"unreadable:\n{item.prediction.error}" if not item.prediction.ok else NO_CAM.replace(": ", ":\n")
            ax_cam.text(0.5, 0.5, text, ha="center", va="center", fontsize=7, wrap=True)
        lines: list[Artist] = [
            HPacker(
                children=[
                    TextArea(
                        text,
                        textprops={
                            "fontsize": 7.5,
                            "family": "monospace",
                            "color": CAPTION_COLOURS[cls],
                            "fontweight": "bold" if cls == "tp" else "normal",
                            "fontstyle": "italic" if cls == "fn" else "normal",
                        },
                    )
                    for text, cls in line
                ],
                pad=0,
                sep=4,
            )
            for line in caption_runs(item)
        ]
        box = AnchoredOffsetbox(
            loc="upper left",
            child=VPacker(children=lines, pad=0, sep=2, align="left"),
            bbox_to_anchor=(0.0, 0.0),
            bbox_transform=ax_img.transAxes,
            frameon=False,
            pad=0.1,
            borderpad=0.3,
        )
        box.set_clip_on(False)
        ax_img.add_artist(box)
    for sf in subfigs[len(items) :]:
        sf.set_visible(False)
    return fig


def render_grid(items: list[ReportItem], model_name: str, subtitle: str) -> bytes:
    """PNG bytes of `grid_figure`."""
    buf = io.BytesIO()
    grid_figure(items, model_name, subtitle).savefig(buf, format="png")
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
            if item.cam.note:
                cam_line += f" &mdash; {e(item.cam.note)}"
        elif item.prediction.ok:
            cam_line = e(NO_CAM)
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
    index: "DatasetIndex",
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
    where = "whole dataset" if split == "all" else f"{split} split"
    subtitle = f"{len(items)} random images of the {where} (seed {seed})"
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
