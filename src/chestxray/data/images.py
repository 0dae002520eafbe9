"""Read any supported radiograph (PNG, JPEG, DICOM) into one 8-bit grayscale array.

Every entry point (prepare, predict, the server, export checks) goes through
`read_image`, so a file reads the same everywhere. DICOM headers are used for pixel
handling only; no tag value is logged, kept or put into an error message.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from chestxray.errors import DecodeLimitError, ImageReadError

MAX_PIXELS = 50_000_000
# A file larger than this is refused before it is read (a 50-megapixel 16-bit RGBA PNG
# stored raw is 400 MB); `DecodeLimits.max_file_bytes` changes it.
MAX_FILE_BYTES = 512 * 2**20
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES
ImageSource = str | os.PathLike | bytes | BinaryIO
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# Only these decoders run on untrusted bytes (PIL knows many more formats).
RASTER_FORMATS = ["PNG", "JPEG"]
NOT_AN_IMAGE = "not a PNG, JPEG or DICOM image"


def is_dicom_bytes(head: bytes) -> bool:
    """True for a DICOM Part-10 file (the 'DICM' magic after the 128-byte preamble)."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def sniff_image_format(head: bytes) -> str | None:
    """ "png", "jpeg", "dicom" (Part-10) or None, from the first 132 bytes."""
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if is_dicom_bytes(head):
        return "dicom"
    return None


def source_name(source: object, name: str | None = None, default: str = "<upload>") -> str:
    """What messages call an input: the given name, else its path, else `default`."""
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return default


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on one decode, judged from the header before any pixel is decoded.

    `max_bytes`: refuse images whose decoded size, width x height x channels x bytes per
    sample as the header states them, exceeds this (None: only MAX_PIXELS applies).
    `max_file_bytes`: refuse a file (path) larger than this before reading it (None: no cap).
    `reduce_to`: images whose shorter side is at least twice this are decoded at an integer
    fraction of their size that keeps the shorter side >= `reduce_to` (JPEG: by the DCT
    scaling of `draft`, straight to gray; PNG: `Image.reduce` right after decoding).
    """

    max_bytes: int | None = None
    reduce_to: int | None = None
    max_file_bytes: int | None = MAX_FILE_BYTES


def read_image(source: ImageSource, name: str | None = None, limits: DecodeLimits | None = None) -> np.ndarray:
    """Decode `source` (a path, raw bytes or a binary file object) to a HxW uint8 array.

    PNG and JPEG in any bit depth and mode (L, RGB, RGBA, palette, 16-bit) and DICOM
    (modality rescale, VOI LUT or window, MONOCHROME1 inverted, any bit depth) all end
    as 8-bit grayscale. `name` is what errors call the input (defaults to the path).
    Raises ImageReadError naming the input and the reason for empty, truncated,
    oversized (> MAX_PIXELS) or non-image data, and for DICOM without pixel data;
    DecodeLimitError (a subclass) past `limits.max_bytes`.
    """
    label = source_name(source, name)
    limits = limits or DecodeLimits()
    data = _read_bytes(source, label, limits.max_file_bytes)
    if not data:
        raise ImageReadError(label, "empty file")
    if is_dicom_bytes(data[:132]):
        return _read_dicom(data, label, limits)
    if data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC):
        return _read_raster(data, label, limits)
    if Path(label).suffix.lower() in (".dcm", ".dicom"):
        return _read_dicom(data, label, limits)  # DICOM without the Part-10 preamble
    return _read_raster(data, label, limits)


def _check_budget(label: str, limits: DecodeLimits, w: int, h: int, channels: int, bits: int) -> None:
    if limits.max_bytes is None:
        return
    cost = w * h * channels * max(1, math.ceil(bits / 8))
    if cost > limits.max_bytes:
        raise DecodeLimitError(
            label,
            f"image of {w}x{h}, {channels} channel(s) of {bits} bit decodes to {cost / 2**20:.0f} MiB, "
            f"over the {limits.max_bytes / 2**20:.4g} MiB decode limit",
        )


def _png_header(data: bytes) -> tuple[int, int]:
    """(channels, bits per sample) from a PNG's IHDR (PIL's mode hides 16-bit colour)."""
    if len(data) >= 26 and data[12:16] == b"IHDR":
        bits, color_type = data[24], data[25]
        return {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color_type, 4), int(bits)
    return 4, 16  # unknown: assume the dearest


def _reduce_factor(w: int, h: int, reduce_to: int | None) -> int:
    if not reduce_to or reduce_to < 1:
        return 1
    return max(1, min(w, h) // reduce_to)


def _read_bytes(source: ImageSource, label: str, max_file_bytes: int | None = MAX_FILE_BYTES) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return _read_file(source, label, max_file_bytes)
    try:
        data = source.read()
    except OSError as exc:
        raise ImageReadError(label, f"cannot read stream ({exc})") from None
    if not isinstance(data, (bytes, bytearray)):
        raise ImageReadError(label, "stream is not opened in binary mode")
    return bytes(data)


def _read_file(path: str | os.PathLike, label: str, max_file_bytes: int | None) -> bytes:
    """A regular file's bytes, checked before they are read: its type from fstat on a
    non-blocking open (a FIFO or device never blocks or streams forever), its size against
    the cap, and its first bytes against the image magics (a large non-image is not read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except ValueError:
        raise ImageReadError(label, "file name contains a NUL byte") from None
    except FileNotFoundError:
        raise ImageReadError(label, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(label, "is a directory, not an image file") from None
    except OSError as exc:
        raise ImageReadError(label, f"cannot read file ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageReadError(label, "is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageReadError(label, "not a regular file (a pipe, socket or device)")
        if max_file_bytes is not None and st.st_size > max_file_bytes:
            raise ImageReadError(
                label,
                f"file of {st.st_size / 2**20:.0f} MiB is over the {max_file_bytes / 2**20:.4g} MiB file size limit",
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            head = f.read(132)
            if sniff_image_format(head) is None and Path(label).suffix.lower() not in DICOM_SUFFIXES and head:
                raise ImageReadError(label, NOT_AN_IMAGE)  # before reading the rest
            return head + f.read()
    except OSError as exc:
        raise ImageReadError(label, f"cannot read file ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _check_pixels(label: str, w: int, h: int, what: str = "image") -> None:
    if w * h > MAX_PIXELS:
        raise ImageReadError(
            label,
            f"{what} of {w}x{h} = {w * h / 1e6:.0f} megapixels exceeds the {MAX_PIXELS / 1e6:.0f} megapixel limit",
        )


def _read_raster(data: bytes, label: str, limits: DecodeLimits) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check warns at ~89 MP; we enforce our lower limit below,
            # from the header, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
            _check_pixels(label, *img.size)
            factor = _reduce_factor(*img.size, limits.reduce_to)
            if img.format == "JPEG":
                if factor > 1:  # DCT scaling: decodes at 1/2..1/8 size, luma only
                    img.draft("L", (img.size[0] // factor, img.size[1] // factor))
                _check_budget(label, limits, *img.size, len(img.getbands()), int(getattr(img, "bits", 8)))
            else:
                _check_budget(label, limits, *img.size, *_png_header(data))
            img.load()
            if factor > 1 and img.format != "JPEG" and img.mode in ("L", "RGB", "RGBA", "I", "F"):
                img = img.reduce(factor)
            if img.format == "JPEG":  # phone photos of films carry an EXIF rotation
                img = ImageOps.exif_transpose(img)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(label, f"image too large ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(label, NOT_AN_IMAGE) from None
    except MemoryError:
        raise ImageReadError(label, "not enough memory to decode the image") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib errors...
        raise ImageReadError(label, f"truncated or corrupt image data ({exc})") from None
    return pil_to_gray8(img, label)


def to_gray(
    image: "ImageSource | np.ndarray | Image.Image", name: str | None = None, limits: DecodeLimits | None = None
) -> np.ndarray:
    """The one way anything becomes an HxW uint8 gray image: a path, bytes or file object
    (`read_image`), a PIL image, or an array (2-D gray, or H x W x 3/4 colour). Colour uses
    PIL's ITU-R 601 luma everywhere, so a pixel gets the same gray from a PNG as from an array."""
    if isinstance(image, np.ndarray):
        return array_to_gray8(image, source_name(image, name, "<array>"))
    if isinstance(image, Image.Image):
        return pil_to_gray8(image, source_name(image, name, "<image>"))
    return read_image(image, name, limits)


def array_to_gray8(arr: np.ndarray, label: str = "<array>") -> np.ndarray:
    """2-D or H x W x 1/3/4 array -> HxW uint8. Floats in [0, 1] are scaled by 255; other
    values are clipped to 0..255; colour goes through PIL's luma (alpha dropped)."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = np.ascontiguousarray(_values_to_uint8(arr[..., :3]))
        return np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.uint8).copy()
    if arr.ndim != 2:
        raise ImageReadError(label, f"expected a 2-D gray or H x W x 3 colour image, got shape {arr.shape}")
    return _values_to_uint8(arr)


def _values_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
        arr = arr * 255.0
    return np.clip(np.rint(np.nan_to_num(arr.astype(np.float64))), 0, 255).astype(np.uint8)


def pil_to_gray8(img: Image.Image, label: str = "<image>") -> np.ndarray:
    """Any PIL mode (L, LA, RGB, RGBA, P, I;16, I, F, 1, CMYK) to HxW uint8 grayscale.

    High bit depth (16-bit PNG) is stretched from its min..max to 0..255, as a DICOM
    without a window is; alpha is dropped (NIH ships RGBA files with an opaque alpha).
    """
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return stretch_to_uint8(np.asarray(img))
    if mode == "RGBA":  # PIL's RGBA -> L is the luma of RGB (alpha dropped): no RGB copy needed
        return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    if mode in ("LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")
    try:
        return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    except (ValueError, OSError) as exc:
        raise ImageReadError(label, f"unsupported image mode {mode!r} ({exc})") from None


def stretch_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Linearly map the finite min..max of `arr` to 0..255 (a flat image gives zeros)."""
    values = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, np.nan)
    lo, hi = (float(np.nanmin(values)), float(np.nanmax(values))) if finite.any() else (0.0, 0.0)
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.uint8)
    out = (values - lo) * (255.0 / (hi - lo))
    return np.nan_to_num(np.clip(np.rint(out), 0, 255), nan=0.0).astype(np.uint8)


def _read_dicom(data: bytes, label: str, limits: DecodeLimits | None = None) -> np.ndarray:
    # pydicom reports odd header values by quoting them, through both `warnings` and its
    # logger: keep them out of every log (they can hold patient data).
    with warnings.catch_warnings(), _quiet_pydicom_log():
        warnings.simplefilter("ignore")
        try:
            return _decode_dicom(data, label, limits or DecodeLimits())
        except ImageReadError:
            raise
        except Exception as exc:  # malformed headers raise many types (VR, struct, length errors)
            raise ImageReadError(label, f"not a readable DICOM file ({type(exc).__name__})") from None


class _DropWhileReading(logging.Filter):
    """Drops pydicom's log records emitted by a thread that is inside `_read_dicom`.

    Attached to every logger of the pydicom tree: a filter on the "pydicom" logger alone
    does not see records of its children (`pydicom.pixels.decoders.base` logs decoder
    tracebacks), since propagation only consults the ancestors' handlers."""

    active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.active, "depth", 0)


_PYDICOM_FILTER = _DropWhileReading()


def _pydicom_loggers() -> list[logging.Logger]:
    import pydicom.pixels  # noqa: F401 - creates the decoder loggers before they are looked up

    names = [n for n in list(logging.Logger.manager.loggerDict) if n.startswith("pydicom.")]
    return [logging.getLogger("pydicom"), *(logging.getLogger(n) for n in names)]


@contextlib.contextmanager
def _quiet_pydicom_log() -> Iterator[None]:
    for logger in _pydicom_loggers():
        if _PYDICOM_FILTER not in logger.filters:
            logger.addFilter(_PYDICOM_FILTER)  # per-thread, so other threads' logging is untouched
    state = _DropWhileReading.active
    state.depth = getattr(state, "depth", 0) + 1
    try:
        yield
    finally:
        state.depth -= 1


def _decode_dicom(data: bytes, label: str, limits: DecodeLimits) -> np.ndarray:
    arr, ds = _dicom_pixels(data, label, limits)
    if _int_tag(ds, "SamplesPerPixel", 1) > 1 or arr.ndim == 3:
        return _color_dicom_to_gray(arr)
    try:
        return _dicom_gray_to_uint8(arr, ds)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(label, f"cannot apply the DICOM value transforms ({type(exc).__name__})") from None


def _dicom_pixels(data: bytes, label: str, limits: DecodeLimits) -> tuple[np.ndarray, Any]:
    """The stored pixel array (first frame) and the dataset, after the header checks."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if len(ds) == 0:
        raise ImageReadError(label, NOT_AN_IMAGE)
    if "PixelData" not in ds:
        raise ImageReadError(label, "DICOM file has no pixel data")
    rows, cols = _int_tag(ds, "Rows", 0), _int_tag(ds, "Columns", 0)
    frames = max(1, _int_tag(ds, "NumberOfFrames", 1))
    if rows <= 0 or cols <= 0:
        raise ImageReadError(label, "DICOM file has no valid Rows/Columns")
    _check_pixels(label, cols, rows * frames, "DICOM pixel data")
    samples, bits = max(1, _int_tag(ds, "SamplesPerPixel", 1)), max(1, _int_tag(ds, "BitsAllocated", 16))
    _check_budget(label, limits, cols, rows * frames, samples, bits)
    _ensure_transfer_syntax(ds)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad pixel data
        raise ImageReadError(label, _pixel_error(ds, exc)) from None
    if frames > 1 and arr.ndim >= 3:
        arr = arr[0]  # first frame of a multi-frame object
    return arr, ds


def _ensure_transfer_syntax(ds: Any) -> None:
    """A dataset without file meta (no preamble) still has an encoding, which pydicom
    guessed while reading; pixel decoding needs it named as a transfer syntax."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def _int_tag(ds: Any, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        return default


def _pixel_error(ds: Any, exc: Exception) -> str:
    """Why the pixel data did not decode: no decoder for its compression (say which packages
    add one), or a decoder that ran and failed (corrupt data). Only the exception type and the
    transfer syntax are named: exception texts can quote header values."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        compressed = syntax is not None and bool(syntax.is_compressed)
    except (ValueError, AttributeError):  # a private or unknown transfer syntax UID
        compressed = False
    if syntax is None or not compressed:
        return f"cannot decode DICOM pixel data: corrupt or truncated ({type(exc).__name__})"
    try:
        from pydicom.pixels import get_decoder

        available = get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):  # no decoder exists for this syntax at all
        available = False
    if available:
        return f"corrupt pixel data: the {syntax.name} decoder could not decode it ({type(exc).__name__})"
    return (
        f"cannot decode DICOM pixel data compressed as {syntax.name} ({type(exc).__name__}); "
        "installing pylibjpeg or python-gdcm adds decoders"
    )


def _color_dicom_to_gray(arr: np.ndarray) -> np.ndarray:
    # pydicom returns RGB (it converts YBR); bring any depth to 8 bit, then luminance.
    rgb = arr if arr.dtype == np.uint8 else stretch_to_uint8(arr)
    return array_to_gray8(rgb[..., :3])


def _dicom_gray_to_uint8(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values -> modality values (rescale / LUT) -> VOI (LUT or window) -> 8 bit,
    inverted for MONOCHROME1 (and an INVERSE presentation LUT)."""
    from pydicom.pixels import apply_modality_lut

    has_modality = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds

    def modality(stored: np.ndarray) -> np.ndarray:
        return apply_modality_lut(stored, ds) if has_modality else stored

    if ds.get("VOILUTSequence"):
        gray = _per_stored_value(arr, lambda v: _apply_voi_lut(modality(v), ds))
    elif (window := _window(ds)) is not None:
        gray = _per_stored_value(arr, lambda v: _apply_window(modality(v), *window))
    elif not has_modality and arr.dtype == np.uint8:
        gray = np.asarray(arr, dtype=np.uint8)  # 8-bit data with no transform: as stored
    else:
        gray = stretch_to_uint8(modality(arr))
    inverse = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).strip() == "INVERSE":
        inverse = not inverse
    return (255 - gray) if inverse else np.ascontiguousarray(gray)


def _per_stored_value(arr: np.ndarray, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`transform(arr)` for a transform that maps each stored value on its own (modality,
    VOI LUT, window): on integer pixels, computed once per value in the image's range and
    looked up. The same result, without floating point over every pixel of a radiograph
    (several times faster on 8 and 16 bit images)."""
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2 or arr.size == 0:
        return transform(arr)
    low = 0 if arr.dtype.kind == "u" else int(arr.min())
    high = int(arr.max())
    if high - low + 1 > arr.size:
        return transform(arr)
    table = transform(np.arange(low, high + 1, dtype=arr.dtype))
    index = arr if low == 0 else np.subtract(arr, low, dtype=np.int32)
    return np.take(table, index)


def _apply_voi_lut(values: np.ndarray, ds: Any) -> np.ndarray:
    """The first VOI LUT of the dataset, to 0..255 (PS3.3 C.11.2.1.1).

    Done here rather than by pydicom 3.0's apply_voi, which indexes an 8-bit LUT with
    8-bit indices and so wraps stored values above 255.
    """
    import struct

    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    element = item["LUTData"]
    if element.VR == "OW" and isinstance(element.value, (bytes, bytearray)):
        little = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        endian = ">" if little is not None and not little.is_little_endian else "<"
        table = np.array(struct.unpack_from(f"{endian}{entries}H", element.value), dtype=np.float32)
    else:
        table = np.asarray(list(element.value), dtype=np.float32)
    if table.size == 0 or not 8 <= bits <= 16:
        raise ValueError("VOI LUT without entries or with an unsupported depth")
    index = np.clip(np.rint(np.asarray(values, dtype=np.float64)) - first, 0, table.size - 1).astype(np.int64)
    return np.clip(np.rint(table[index] * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8)


def _window(ds: Any) -> tuple[float, float, str] | None:
    """(center, width, function) of the first window, or None when absent or invalid."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        c, w = _first_float(center), _first_float(width)
        func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    except (TypeError, ValueError, IndexError, StopIteration):
        return None
    if not (math.isfinite(c) and math.isfinite(w)) or w <= 0 or (func == "LINEAR" and w < 1):
        return None
    return c, w, func


def _first_float(value: Any) -> float:
    # A window tag holds one value (DSfloat) or several alternatives (MultiValue).
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (str, bytes)):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        return float(text.split("\\")[0])
    return float(next(iter(value)))


def _apply_window(values: np.ndarray, center: float, width: float, func: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window, straight to 0..255."""
    x = np.asarray(values, dtype=np.float32)
    if func == "SIGMOID":
        with np.errstate(over="ignore"):  # far below the window: exp -> inf, y -> 0
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif func == "LINEAR_EXACT":
        y = (x - center) / width + 0.5
    else:  # LINEAR (the default; unknown functions fall back to it)
        y = (x - (center - 0.5)) / (width - 1.0) + 0.5 if width > 1 else (x > center - 0.5).astype(np.float32)
    return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class DicomValues:
    """A grayscale DICOM's pixels as modality values, for viewers that window them.

    `values` (HxW float64) are the stored values after the modality rescale or LUT, negated
    for MONOCHROME1 (or an INVERSE presentation LUT) so that larger is always brighter;
    `window` is the dataset's first linear window (centre, width) in those same values, or
    None when it has none (or only a VOI LUT table)."""

    values: np.ndarray
    window: tuple[float, float] | None
    flipped: bool


def read_dicom_values(data: bytes, name: str, limits: DecodeLimits | None = None) -> DicomValues | None:
    """`data`'s modality values when it is a grayscale DICOM, None for any other image.
    Raises ImageReadError (or DecodeLimitError) as `read_image` does for a broken DICOM."""
    if not is_dicom_bytes(data[:132]) and Path(name).suffix.lower() not in (".dcm", ".dicom"):
        return None
    with warnings.catch_warnings(), _quiet_pydicom_log():
        warnings.simplefilter("ignore")
        try:
            arr, ds = _dicom_pixels(data, name, limits or DecodeLimits())
            if _int_tag(ds, "SamplesPerPixel", 1) > 1 or arr.ndim == 3:
                return None
            from pydicom.pixels import apply_modality_lut

            has_modality = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
            values = np.asarray(apply_modality_lut(arr, ds) if has_modality else arr, dtype=np.float64)
            window = _window(ds)
            flipped = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
            if str(ds.get("PresentationLUTShape", "")).strip() == "INVERSE":
                flipped = not flipped
        except ImageReadError:
            raise
        except Exception as exc:  # malformed headers raise many types (VR, struct, length errors)
            raise ImageReadError(name, f"not a readable DICOM file ({type(exc).__name__})") from None
    centre_width = (window[0], window[1]) if window is not None else None
    if flipped:
        values = -values
        centre_width = (-centre_width[0], centre_width[1]) if centre_width is not None else None
    return DicomValues(values=values, window=centre_width, flipped=flipped)
