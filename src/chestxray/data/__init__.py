"""Data layer: the NIH index and splits, image reading, the prepared cache, transforms."""

from chestxray.data.images import read_image

__all__ = ["read_image"]
