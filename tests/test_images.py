"""read_image: every format, mode and bit depth to one 8-bit gray array, and every bad
input to one ImageReadError naming the file and the reason. Inputs are real NIH images
or are written here from them."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxray.data.images import MAX_PIXELS, read_image, stretch_to_uint8
from chestxray.errors import ImageReadError
from dicom_helpers import dicom_bytes


@pytest.fixture(scope="module")
def gray(sample_images) -> np.ndarray:
    """A real 256 px NIH radiograph whose values run 0..248 (not the full 8-bit range)."""
    g = np.asarray(Image.open(sample_images[0]))
    assert g.dtype == np.uint8 and g.min() == 0 and g.max() == 248
    return g


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


# -- PNG and JPEG ------------------------------------------------------------------------------


def test_real_originals_read_as_gray(original_png, rgba_png):
    for path in (original_png, rgba_png):
        out = read_image(path)
        assert out.dtype == np.uint8 and out.shape == (1024, 1024)
    assert Image.open(rgba_png).mode == "RGBA"
    want = np.asarray(Image.open(rgba_png).convert("RGB").convert("L"))
    np.testing.assert_array_equal(read_image(rgba_png), want)
    np.testing.assert_array_equal(read_image(original_png), np.asarray(Image.open(original_png)))


def test_paths_bytes_and_streams_read_the_same(sample_images):
    path = sample_images[1]
    want = read_image(path)
    np.testing.assert_array_equal(read_image(str(path)), want)
    np.testing.assert_array_equal(read_image(path.read_bytes()), want)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(read_image(f), want)


def test_rgb_palette_and_alpha_modes(tmp_path, gray):
    rgb = Image.fromarray(np.stack([gray] * 3, -1))
    np.testing.assert_array_equal(read_image(save(rgb, tmp_path / "rgb.png")), gray)
    rgba = Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)]))
    np.testing.assert_array_equal(read_image(save(rgba, tmp_path / "rgba.png")), gray)
    la = Image.fromarray(np.dstack([gray, np.full_like(gray, 200)]), mode="LA")
    np.testing.assert_array_equal(read_image(save(la, tmp_path / "la.png")), gray)
    pal = Image.fromarray(gray, mode="L").convert("P")  # no dithering from L
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.putdata(list(gray.ravel()))
    path = save(pal, tmp_path / "palette.png")
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(read_image(path), gray)
    path = save(pal, tmp_path / "palette-t.png", transparency=0)
    assert "transparency" in Image.open(path).info
    np.testing.assert_array_equal(read_image(path), gray)


@pytest.mark.parametrize("scale", [257, 16])  # full 16-bit range, and 12-bit data in 16 bits
def test_16_bit_png_is_stretched_to_8_bit(tmp_path, gray, scale):
    path = save(Image.fromarray(gray.astype(np.uint16) * scale), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = read_image(path)
    # Min..max to 0..255: the image's 0..248 becomes 0..255, whatever the bit depth.
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.abs(out - gray.astype(float) * 255 / 248).max() <= 0.51


def test_jpeg_reads_close_to_the_png(tmp_path, gray):
    out = read_image(save(Image.fromarray(gray), tmp_path / "x.jpg", quality=95))
    assert out.shape == gray.shape and np.abs(out.astype(int) - gray).mean() < 1.5
    rgb = read_image(save(Image.fromarray(np.stack([gray] * 3, -1)), tmp_path / "c.jpeg", quality=95))
    assert np.abs(rgb.astype(int) - gray).mean() < 1.5


def test_jpeg_exif_rotation_is_applied(tmp_path, gray):
    wide = gray[:100]  # 100 x 256
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = save(Image.fromarray(wide), tmp_path / "phone.jpg", quality=95, exif=exif.tobytes())
    out = read_image(path)
    assert out.shape == (256, 100)
    assert np.abs(out.astype(int) - np.rot90(wide, -1)).mean() < 2


def test_stretch_edge_cases():
    assert not stretch_to_uint8(np.full((4, 4), 7.0)).any()
    out = stretch_to_uint8(np.array([[0.0, np.nan], [np.inf, 2.0]]))
    assert out.tolist() == [[0, 0], [0, 255]]


# -- bad input ---------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height 8-bit gray pixels, with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def bad_file(kind: str, tmp_path: Path, original_png: Path) -> Path:
    data = original_png.read_bytes()
    if kind == "empty":
        return _write(tmp_path / "empty.png", b"")
    if kind == "truncated-png":
        return _write(tmp_path / "cut.png", data[: len(data) // 3])
    if kind == "truncated-jpeg":
        buf = io.BytesIO()
        Image.open(original_png).save(buf, "JPEG", quality=90)
        return _write(tmp_path / "cut.jpg", buf.getvalue()[: len(buf.getvalue()) // 2])
    if kind == "text":
        return _write(tmp_path / "notes.png", b"Patient notes, not an image\n" * 10)
    if kind == "gif":
        return save(Image.open(original_png).convert("L"), tmp_path / "x.gif")
    if kind == "huge-png":
        return _write(tmp_path / "huge.png", huge_png(10_000, 6_000))  # 60 MP
    if kind == "bomb-png":
        return _write(tmp_path / "bomb.png", huge_png(20_000, 20_000))  # 400 MP: PIL's own limit
    if kind == "garbage-dcm":
        return _write(tmp_path / "x.dcm", b"\x00\x01garbage" * 40)
    if kind == "not-found":
        return tmp_path / "nowhere.png"
    if kind == "directory":
        return tmp_path
    raise AssertionError(kind)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty", "empty file"),
        ("truncated-png", "truncated or corrupt"),
        ("truncated-jpeg", "truncated or corrupt"),
        ("text", "not a PNG, JPEG or DICOM image"),
        ("gif", "not a PNG, JPEG or DICOM image"),
        ("huge-png", "10000x6000 = 60 megapixels exceeds the 50 megapixel limit"),
        ("bomb-png", "too large|exceeds"),
        ("garbage-dcm", "DICOM|not a PNG"),
        ("not-found", "file not found"),
        ("directory", "is a directory"),
    ],
)
def test_bad_input_names_file_and_reason(tmp_path, original_png, kind, reason):
    path = bad_file(kind, tmp_path, original_png)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    err = info.value
    assert err.source == str(path) and str(err).startswith(f"{path}: ")
    # Bytes name the upload as the caller says.
    if path.is_file():
        with pytest.raises(ImageReadError, match=r"^scan\.x: "):
            read_image(path.read_bytes(), name="scan.x")


def test_limit_is_megapixels_not_side(tmp_path):
    assert MAX_PIXELS == 50_000_000
    with pytest.raises(ImageReadError, match="megapixel limit"):
        read_image(huge_png(50_001, 1000))
    # Just under the limit is not refused for its size (it fails on the missing pixels).
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(huge_png(10_000, 5_000))


# -- DICOM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_with_rescale_and_window_reads_back_the_png(gray, photometric):
    # Stored 12-bit s = 16 v + 10, modality m = 0.5 s - 1024 = 8 v - 1019, and the window
    # (center 1.5, width 2041) maps m linearly back onto v (PS3.3 C.11.2.1.2). MONOCHROME1
    # stores the inverted image (v = 255 - g), which the reader inverts back.
    v = gray.astype(np.uint16) if photometric == "MONOCHROME2" else 255 - gray.astype(np.uint16)
    data = dicom_bytes(v * 16 + 10, photometric=photometric, slope=0.5, intercept=-1024, window=(1.5, 2041))
    out = read_image(data, name="x.dcm")
    assert out.dtype == np.uint8 and out.shape == gray.shape
    assert np.abs(out.astype(int) - gray).max() <= 1  # 0..248 stays 0..248: the window rules


def test_dicom_narrow_window_clips(gray):
    # A window on g in [50, 200]: darker pixels go black, brighter white, linear between.
    stored = gray.astype(np.uint16) * 16
    out = read_image(dicom_bytes(stored, window=(125 * 16, 150 * 16)))
    want = np.clip((gray.astype(float) - 50) / 150 * 255, 0, 255)
    assert np.abs(out - want).max() <= 1.5
    assert (out[gray <= 49] == 0).all() and (out[gray >= 201] == 255).all()


@pytest.mark.parametrize("lut_max", [255, 65535])
def test_dicom_voi_lut_sequence(gray, lut_max):
    # A 4096-entry LUT that undoes s = 16 g + 100 (8-bit entries as US, 16-bit as OW).
    stored = gray.astype(np.uint16) * 16 + 100
    lut = (np.clip((np.arange(4096) - 100) / 16, 0, 255).round() * (lut_max // 255)).astype(np.uint16)
    out = read_image(dicom_bytes(stored, lut=lut))
    np.testing.assert_array_equal(out, gray)


@pytest.mark.parametrize(
    "stored",
    [
        np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(4, 0),
        (np.arange(4096, dtype=np.uint16) * 7 % 4096).reshape(64, 64),
        np.linspace(-2000, 3000, 128 * 128).astype(np.int16).reshape(128, 128),
        np.array([[0, 65535], [1000, 1200]], dtype=np.uint16),  # wider range than pixels: computed per pixel
        np.linspace(-1000, 3000, 16).astype(np.float32).reshape(4, 4),  # not integers: per pixel
    ],
    ids=["uint8", "uint16", "int16", "sparse", "float"],
)
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_value_transforms_by_table_equal_per_pixel(stored, function):
    # The table path must give exactly what the per-pixel transform gives, for every stored type.
    from chestxray.data.images import _apply_window, _per_stored_value

    def transform(v: np.ndarray) -> np.ndarray:
        return _apply_window(v.astype(np.float64) * 0.5 - 100, 300.0, 1500.0, function)

    want = transform(stored)
    got = _per_stored_value(stored, transform)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) > 2  # the window spreads these values: a wrong index would show


def test_dicom_reads_equal_with_and_without_the_table(gray, monkeypatch):
    from chestxray.data import images

    cases = [
        dicom_bytes(gray.astype(np.uint16) * 16 + 10, slope=0.5, intercept=-1024, window=(1.5, 2041)),
        dicom_bytes(gray.astype(np.uint16) * 16, photometric="MONOCHROME1", window=(125 * 16, 150 * 16)),
        dicom_bytes(gray.astype(np.uint16) * 16 + 100, lut=(np.arange(4096) % 256).astype(np.uint16)),
    ]
    fast = [read_image(c) for c in cases]
    monkeypatch.setattr(images, "_per_stored_value", lambda arr, transform: transform(arr))
    for c, f in zip(cases, fast, strict=True):
        np.testing.assert_array_equal(read_image(c), f)


def test_dicom_without_window_is_stretched_and_8_bit_is_kept(gray):
    out = read_image(dicom_bytes(gray.astype(np.uint16) * 16 + 100))
    np.testing.assert_array_equal(out, stretch_to_uint8(gray))  # 12-bit: min..max to 0..255
    np.testing.assert_array_equal(read_image(dicom_bytes(gray, bits=8)), gray)  # 8-bit: as stored
    # Without the Part-10 preamble a .dcm name still routes to the DICOM reader.
    raw = dicom_bytes(gray, bits=8, preamble=False)
    assert raw[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(raw, name="old.dcm"), gray)


def test_bad_dicoms_name_file_and_reason_and_leak_no_tags(tmp_path, gray, caplog):
    cases = {
        "nopixels.dcm": (dicom_bytes(gray, bits=8, pixels=False), "DICOM file has no pixel data"),
        "cut.dcm": (dicom_bytes(gray, bits=8)[:-5000], "cannot decode DICOM pixel data"),
        "huge.dcm": (dicom_bytes(np.zeros((8000, 7000), np.uint8), bits=8)[:4000], "exceeds the 50 megapixel"),
    }
    with caplog.at_level(logging.DEBUG):
        for name, (data, reason) in cases.items():
            path = tmp_path / name
            path.write_bytes(data)
            with pytest.raises(ImageReadError, match=reason) as info:
                read_image(path)
            assert info.value.source == str(path)
            for secret in ("Doe", "Jane", "4711"):
                assert secret not in str(info.value)
        read_image(dicom_bytes(gray, bits=8))
    for secret in ("Doe", "Jane", "4711"):
        assert secret not in caplog.text


def garbage_jpeg2000_dicom() -> bytes:
    """A Part-10 DICOM whose transfer syntax is JPEG 2000 and whose one fragment is a
    J2K start-of-codestream marker followed by garbage."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = JPEG2000Lossless
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 16, 16, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(200))])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_corrupt_jpeg2000_dicom_is_quiet_and_called_corrupt(caplog, capfd):
    """pydicom's child logger (pydicom.pixels.decoders.base) logs the decoder's traceback;
    nothing of it may reach the logs, and the message must not blame missing decoders
    when a JPEG 2000 decoder (Pillow) was there and failed."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    if not get_decoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 decoder in this environment")
    root = logging.getLogger()
    handler = logging.StreamHandler()  # what a CLI user's basicConfig sets up
    root.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(ImageReadError) as info:
            read_image(garbage_jpeg2000_dicom(), name="j2k.dcm")
    finally:
        root.removeHandler(handler)
    assert "corrupt pixel data" in info.value.reason and "JPEG 2000" in info.value.reason
    assert "pylibjpeg" not in info.value.reason
    assert [r.name for r in caplog.records if r.name.startswith("pydicom")] == []
    err = capfd.readouterr().err
    assert "Traceback" not in err and "pydicom" not in err
    # Another thread's (or a later) pydicom log record still goes through.
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("pydicom.pixels.decoders.base").warning("outside a read")
    assert "outside a read" in caplog.text


def test_a_green_pixel_is_one_gray_from_an_array_a_png_and_the_overlay(tmp_path):
    """Colour to gray has one owner (`to_gray`, ITU-R 601 luma as PIL's "L"): pure green is
    150 whichever way it comes in (a channel mean gave 85 for arrays)."""
    from chestxray.inference.predict import Analyzer

    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 1] = 255
    png = tmp_path / "green.png"
    Image.fromarray(rgb).save(png)
    rgba = np.concatenate([rgb, np.full((4, 6, 1), 255, np.uint8)], axis=2)
    grays = {
        "read_image(png)": read_image(png),
        "Analyzer.to_gray(png)": Analyzer.to_gray(png),
        "Analyzer.to_gray(rgb)": Analyzer.to_gray(rgb),
        "Analyzer.to_gray(rgba)": Analyzer.to_gray(rgba),
        "Analyzer.to_gray(rgb float)": Analyzer.to_gray(rgb.astype(np.float32) / 255.0),
    }
    try:  # the overlay's colormap needs matplotlib (torch extra); the light install has none
        from chestxray.inference.explain import overlay

        grays["overlay(rgb) at alpha 0"] = overlay(rgb, np.ones((4, 6), np.float32), alpha=0.0)[..., 0]
    except ModuleNotFoundError as exc:
        assert exc.name == "matplotlib"
    for how, gray in grays.items():
        assert gray.dtype == np.uint8 and gray.shape == (4, 6), how
        assert set(np.unique(gray).tolist()) == {150}, f"{how}: {np.unique(gray)}"
