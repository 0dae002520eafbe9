"""Four real NIH test-split radiographs (256 px) shipped with the package; see README.md."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def sample_images() -> list[Path]:
    """The packaged sample radiographs, sorted by name."""
    folder = Path(str(files(__name__)))
    return sorted(folder.glob("*.png"))
