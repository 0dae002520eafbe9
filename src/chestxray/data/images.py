"""Read any supported radiograph (PNG, JPEG, DICOM) into one 8-bit grayscale array.

Every entry point (prepare, predict, the server, export checks) goes through
`read_image`, so a file reads the same everywhere. DICOM headers are used for pixel
handling only; no tag is logged or kept.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from chestxray.errors import ImageReadError

MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
ImageSource = Union[str, os.PathLike, bytes, BinaryIO]


def is_dicom_bytes(head: bytes) -> bool:
    """True for a DICOM Part-10 file (the 'DICM' magic after the 128-byte preamble)."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def _source_name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<upload>"


def read_image(source: ImageSource, name: str | None = None) -> np.ndarray:
    """Decode `source` (a path, raw bytes or a binary file object) to a HxW uint8 array.

    `name` is what errors call the input (defaults to the path). Raises ImageReadError
    naming the input and the reason for empty, truncated, oversized or non-image data,
    and for DICOM without pixel data.
    """
    label = _source_name(source, name)
    data = _read_bytes(source, label)
    if not data:
        raise ImageReadError(label, "empty file")
    suffix = Path(label).suffix.lower()
    if is_dicom_bytes(data[:132]) or suffix in (".dcm", ".dicom"):
        return _read_dicom(data, label)
    return _read_raster(data, label)


def _read_bytes(source: ImageSource, label: str) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, (str, os.PathLike)):
        try:
            return Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageReadError(label, "file not found") from None
        except IsADirectoryError:
            raise ImageReadError(label, "is a directory, not an image file") from None
        except OSError as exc:
            raise ImageReadError(label, f"cannot read file ({exc.strerror or exc})") from None
    return source.read()


def _read_raster(data: bytes, label: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check warns at ~89 MP; we enforce our lower limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageReadError(
                    label, f"image of {w}x{h} = {w * h / 1e6:.0f} megapixels exceeds the "
                    f"{MAX_PIXELS / 1e6:.0f} megapixel limit"
                )
            img.load()
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(label, "not a PNG, JPEG or DICOM image") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(label, f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(label, f"truncated or corrupt image data ({exc})") from None
    return pil_to_gray8(img, label)


def pil_to_gray8(img: Image.Image, label: str = "<image>") -> np.ndarray:
    """Any PIL mode (L, LA, RGB, RGBA, P, I;16, I, F, 1) to HxW uint8 grayscale."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth: stretch the used range to 8 bit (as DICOM below).
        return _to_uint8(np.asarray(img).astype(np.float64))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # NIH ships some RGBA files with an opaque alpha; drop alpha, keep the gray.
        img = img.convert("RGBA").convert("RGB")
    try:
        return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    except (ValueError, OSError) as exc:
        raise ImageReadError(label, f"unsupported image mode {mode!r} ({exc})") from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _read_dicom(data: bytes, label: str) -> np.ndarray:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as exc:  # pragma: no cover - pydicom is a core dependency
        raise ImageReadError(label, f"DICOM support needs pydicom ({exc})") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError) as exc:
        raise ImageReadError(label, f"not a readable DICOM file ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise ImageReadError(label, "DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > MAX_PIXELS:
        raise ImageReadError(label, f"DICOM image of {cols}x{rows} exceeds the pixel limit")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad pixel data
        # Only the exception type: its text can quote header values.
        raise ImageReadError(label, f"cannot decode DICOM pixel data ({type(exc).__name__})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]  # first frame of a multi-frame object
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1 or arr.ndim == 3:
        gray = np.asarray(Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("L"))
        return gray.copy()
    try:
        values = apply_modality_lut(arr, ds)
        values = apply_voi_lut(values, ds, prefer_lut=True)
    except Exception as exc:
        raise ImageReadError(label, f"cannot apply DICOM LUTs ({type(exc).__name__})") from None
    out = _to_uint8(np.asarray(values, dtype=np.float64))
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: low values are bright
    return out
