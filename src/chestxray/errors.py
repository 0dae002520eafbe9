"""One error family for everything a user can get wrong, each naming what broke."""

from __future__ import annotations

import os


class ChestXrayError(Exception):
    """Base class of the errors this package raises for bad input."""


class ImageReadError(ChestXrayError):
    """An image file (or upload) could not be read; names the source and the reason."""

    def __init__(self, source: str | os.PathLike[str] | None, reason: str) -> None:
        self.source = str(source) if source is not None else "<bytes>"
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class DecodeLimitError(ImageReadError):
    """The image would take more memory to decode than the caller's budget allows
    (judged from its header: width x height x channels x bytes per sample)."""


class DatasetError(ChestXrayError):
    """The dataset root, its labels file or its split lists are unusable."""


class LabelError(DatasetError):
    """A 'Finding Labels' value names a finding this package does not know."""


class BundleError(ChestXrayError):
    """A model bundle is missing, malformed or does not match its architecture."""


class ExportError(ChestXrayError):
    """Export failed or its check did not pass; nothing was written."""


class WeightsUnavailableError(ChestXrayError):
    """Pretrained weights were asked for but cannot be had (offline, missing file)."""


class OutputError(ChestXrayError):
    """An output file or folder cannot be written (permissions, not a folder, disk full)."""
