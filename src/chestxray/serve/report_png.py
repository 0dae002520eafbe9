"""The viewer's one-page PNG report: the image as windowed, the chosen overlay, the findings
with their thresholds, the warnings and the not-for-clinical-use line (drawn with Pillow)."""

from __future__ import annotations

import io
import textwrap
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from chestxray import NOT_FOR_CLINICAL_USE

PAGE_W, IMAGE_SIDE, MARGIN = 1400, 760, 32
INK, MUTED, AMBER, BG = (20, 24, 30), (90, 100, 112), (150, 90, 0), (255, 255, 255)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def report_page(
    rgb: np.ndarray, prediction: Any, model: str, window_text: str, caption: str | None, *, time_text: str = ""
) -> bytes:
    """PNG bytes of the report; `rgb` (HxWx3 uint8) is the image as the reader sees it."""
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    scale = IMAGE_SIDE / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    big, mid, small = _font(30), _font(19), _font(16)
    right = MARGIN * 2 + IMAGE_SIDE
    text_w = PAGE_W - right - MARGIN
    rows = len(prediction.findings)
    warnings = list(prediction.warnings or [])
    warn_lines = [line for w in warnings for line in textwrap.wrap(f"Warning: {w}", 60)]
    notes = textwrap.wrap(window_text, 90) + textwrap.wrap(caption or "No Grad-CAM overlay.", 90)
    left_end = MARGIN + 72 + image.height + 8 + 22 * len(notes)
    right_end = MARGIN + 72 + 26 * len(warn_lines) + 8 + 30 * (rows + 1) + 30
    height = max(left_end, right_end) + 24 + 56
    page = Image.new("RGB", (PAGE_W, height), BG)
    draw = ImageDraw.Draw(page)
    draw.text((MARGIN, MARGIN), "chestxray report", font=big, fill=INK)
    draw.text(
        (MARGIN, MARGIN + 40), f"Model {model} · {prediction.variant or ''} {time_text}".strip(), font=small, fill=MUTED
    )
    top = MARGIN + 72
    page.paste(image, (MARGIN, top))
    y = top + image.height + 8
    for line in notes:
        draw.text((MARGIN, y), line, font=small, fill=MUTED)
        y += 22

    y = top
    for line in warn_lines:
        draw.text((right, y), line, font=mid, fill=AMBER)
        y += 26
    if warn_lines:
        y += 8
    draw.text((right, y), "Finding", font=mid, fill=INK)
    for x, head in ((right + 240, "Probability"), (right + 350, "Threshold")):
        draw.text((x, y), head, font=mid, fill=INK)
    y += 30
    draw.line((right, y - 4, right + text_w, y - 4), fill=MUTED)
    for f in prediction.findings:
        colour = (AMBER if not warnings else MUTED) if f.positive else INK
        draw.text((right, y), f.finding, font=mid, fill=colour)
        draw.text((right + 240, y), f"{100 * f.probability:.1f}%", font=mid, fill=colour)
        draw.text((right + 350, y), f"{100 * f.threshold:.1f}%", font=mid, fill=MUTED)
        if f.positive:
            draw.text((right + 450, y), "ABOVE", font=mid, fill=colour)
        y += 30
    if prediction.threshold_policy:
        draw.text((right, y + 6), f"Thresholds: operating point {prediction.threshold_policy}", font=small, fill=MUTED)
    draw.rectangle((0, height - 56, PAGE_W, height), fill=(42, 33, 18))
    draw.text((MARGIN, height - 42), NOT_FOR_CLINICAL_USE, font=mid, fill=(247, 223, 174))
    buf = io.BytesIO()
    page.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
