"""Images the viewer shows: the decoded radiograph and Grad-CAM overlays, as PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: Longest side of the images sent to the browser; originals can be 3000+ px (DICOM).
DISPLAY_MAX_SIDE = 1024


def display_shape(shape: tuple[int, ...], max_side: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(height, width) scaled so that the longest side is at most `max_side`, aspect kept."""
    h, w = int(shape[0]), int(shape[1])
    scale = min(1.0, max_side / max(h, w, 1))
    return max(1, round(h * scale)), max(1, round(w * scale))


def fit(image: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """Downscale a HxW uint8 or float32 image to `display_shape` (antialiased); smaller ones are kept."""
    h, w = display_shape(image.shape, max_side)
    if (h, w) == image.shape[:2]:
        return image
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    resized = Image.fromarray(np.asarray(image, dtype=np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def png_bytes(image: np.ndarray) -> bytes:
    """HxW or HxWx3 uint8 -> PNG (fast compression: these are sent once, not archived)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def cam_png(gray: np.ndarray, heatmap: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> bytes:
    """The Grad-CAM `heatmap` (HxW in [0, 1], same size as `gray`) laid over `gray`, as PNG."""
    from chestxray.inference.explain import overlay

    small = fit(gray, max_side)
    heat = np.clip(fit(np.asarray(heatmap, dtype=np.float32), max_side), 0.0, 1.0)
    return png_bytes(overlay(small, heat))


def legend_png(width: int = 256, height: int = 12, gray: int = 128) -> bytes:
    """A horizontal colour bar: the overlay of a 0 -> 1 ramp on mid-gray."""
    from chestxray.inference.explain import overlay

    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return png_bytes(overlay(np.full((height, width), gray, dtype=np.uint8), ramp))
