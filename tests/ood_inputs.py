"""Inputs that are not chest X-rays, for the input check's tests and benchmark
(benchmarks/input_check.py imports this file): scikit-image's bundled sample pictures
(test-only dependency; only those shipped inside the wheel, nothing is downloaded),
rendered text, noise and a colour chart; and altered real radiographs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Shipped inside scikit-image's wheel (skimage/data/*), so no download is attempted.
SKIMAGE_SAMPLES = (
    "astronaut", "camera", "coffee", "chelsea", "coins", "moon", "rocket", "page", "text", "horse",
    "clock", "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel",
    "logo", "checkerboard", "cell", "colorwheel",
)  # fmt: skip


def skimage_pictures() -> list[tuple[str, np.ndarray]]:
    from skimage import data

    out = []
    for name in SKIMAGE_SAMPLES:
        try:
            img = getattr(data, name)()
        except Exception:  # a sample this version fetches from the network: skipped, never downloaded
            continue
        out.append((f"skimage:{name}", _gray8(img)))
    return out


def _gray8(img: np.ndarray) -> np.ndarray:
    from chestxray.data.images import to_gray

    arr = np.asarray(img)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return to_gray(arr)


def rendered_text(n: int = 4, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "chest",
        "radiograph",
        "report",
        "impression",
        "normal",
    ]
    out = []
    for i in range(n):
        img = Image.new("L", (512, 512), 255 if i % 2 == 0 else 0)
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=18 + 6 * i)
        for line in range(14):
            text = " ".join(rng.choice(words, 5))
            draw.text((10, 10 + line * (34 + 6 * i)), text, fill=0 if i % 2 == 0 else 255, font=font)
        out.append((f"text:{i}", np.asarray(img)))
    return out


def noise(n: int = 4, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            arr = rng.integers(0, 256, (256, 256))
        else:
            arr = np.clip(rng.normal(128, 40, (256, 256)), 0, 255)
        out.append((f"noise:{'uniform' if i % 2 == 0 else 'gaussian'}{i}", arr.astype(np.uint8)))
    return out


def colour_chart() -> list[tuple[str, np.ndarray]]:
    """A 6 x 4 chart of saturated and gray patches (ColorChecker-like), and a hue sweep."""
    from chestxray.data.images import to_gray

    rng = np.random.default_rng(1)
    chart = np.zeros((400, 600, 3), np.uint8)
    for r in range(4):
        for c in range(6):
            chart[r * 100 + 5 : r * 100 + 95, c * 100 + 5 : c * 100 + 95] = rng.integers(0, 256, 3)
    hue = np.linspace(0, 1, 512)[None, :].repeat(256, 0)
    sweep = np.stack([np.sin(2 * np.pi * (hue + k / 3)) * 127 + 128 for k in range(3)], -1).astype(np.uint8)
    return [("chart:patches", to_gray(chart)), ("chart:hue", to_gray(sweep))]


def non_radiographs() -> list[tuple[str, np.ndarray]]:
    return skimage_pictures() + rendered_text() + noise() + colour_chart()


def altered_radiographs(grays: Sequence[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """Each radiograph inverted (negative) and turned 90 degrees."""
    out = []
    for name, g in grays:
        out.append((f"inverted:{name}", 255 - g))
        out.append((f"rotated90:{name}", np.ascontiguousarray(np.rot90(g))))
    return out
