"""The torch-free install (`chestxray[infer,serve]`): reading PNG and DICOM, the packaged
ONNX model on onnxruntime, and the REST API on it. Nothing here imports torch, so
`make floors` runs this file in a venv holding the lowest declared versions."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from chestxray.data.images import read_image

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def default_onnx():
    from chestxray.errors import BundleError
    from chestxray.inference.onnx_backend import default_onnx_path
    from chestxray.inference.predict import Analyzer

    try:
        path = default_onnx_path()
    except BundleError:
        pytest.skip("this install ships no default.onnx")
    return Analyzer.load(path, backend="onnx")


def _dicom(gray: np.ndarray) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"  # inverted on reading
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (255 - gray).astype(np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_onnx_backend_reads_png_and_dicom_alike_without_torch(default_onnx, sample_images):
    gray = read_image(sample_images[0])
    dicom = _dicom(gray)
    assert np.array_equal(read_image(dicom, name="x.dcm"), gray)  # MONOCHROME1 is inverted back
    png, dcm = default_onnx.predict([sample_images[0], dicom], names=["a.png", "a.dcm"])
    assert png.ok and dcm.ok and png.variant == "onnx int8"
    assert len(png.findings) == 14 and all(0.0 <= f.probability <= 1.0 for f in png.findings)
    for f in png.findings:
        assert dcm.probability(f.finding) == pytest.approx(f.probability, abs=2e-3)
    bad = default_onnx.predict(b"not an image", names=["junk"])
    assert not bad.ok and "not a PNG, JPEG or DICOM image" in bad.error


def test_rest_api_on_the_onnx_backend(default_onnx, sample_images):
    from chestxray.serve.app import create_app
    from chestxray.serve.runtime import ServeSettings

    with warnings.catch_warnings():  # Starlette warns about its httpx-based client on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from fastapi.testclient import TestClient

    png = sample_images[1].read_bytes()
    want = default_onnx.predict(png, names=["upload"])
    with TestClient(create_app(default_onnx, settings=ServeSettings(max_upload_bytes=2**20))) as client:
        info = client.get("/api/v1/model").json()
        assert (info["backend"], info["variant"], info["grad_cam"]) == ("onnx", "onnx int8", True)
        r = client.post("/api/v1/predict", files={"file": ("x.png", png, "image/png")})
        assert r.status_code == 200, r.text
        got = {f["finding"]: f["probability"] for f in r.json()["findings"]}
        assert got == pytest.approx({f.finding: f.probability for f in want.findings}, abs=1e-6)
        r = client.post("/api/v1/predict", files={"file": ("x.dcm", _dicom(read_image(png)), "application/dicom")})
        assert r.status_code == 200 and r.json()["file"] == "upload"
        r = client.post("/api/v1/predict", files={"file": ("x.png", b"GIF89a....", "image/gif")})
        assert r.status_code == 415 and "not a PNG, JPEG or DICOM image" in r.json()["detail"]
        r = client.post("/api/v1/predict", files={"file": ("x.png", b"\0" * (2**20 + 10), "image/png")})
        assert r.status_code == 413 and "MiB" in r.json()["detail"]
        cam = client.post("/api/v1/cam?finding=Mass", files={"file": ("x.png", png, "image/png")})
        assert cam.status_code == 200 and cam.content.startswith(b"\x89PNG")
        page = client.get("/").text
        assert "up to 1 MiB" in page and page.lower().count("not for clinical use") == 1
    Image.open(io.BytesIO(png)).verify()


BLOCKED = ("torch", "torchvision", "matplotlib", "safetensors", "onnx", "onnxscript", "pandas", "sklearn", "scipy")
NO_TORCH_CLI = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"blocked import of {{name}}")
sys.meta_path.insert(0, Block())
from chestxray.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_predict_cam_on_the_packaged_onnx_without_torch_or_matplotlib(default_onnx, tmp_path):
    """What `make run` does, in an environment where torch and matplotlib cannot be imported:
    `predict --backend onnx --cam` on the packaged model writes an overlay per explained
    finding, at the radiograph's size, from the graph's class activation maps."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "00013125_000.png"
    script = tmp_path / "notorch.py"
    script.write_text(NO_TORCH_CLI)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "predict",
            "--backend",
            "onnx",
            str(example),
            "--cam",
            str(tmp_path / "cam"),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    record = json.loads(proc.stdout)[0]
    assert record["variant"] == "onnx int8" and record["overlays"]
    positives = [f["finding"] for f in record["findings"] if f["positive"]]
    assert [o["finding"] for o in record["overlays"]] == (positives or [record["findings"][0]["finding"]])
    width, height = Image.open(example).size
    for o in record["overlays"]:
        with Image.open(o["path"]) as im:
            assert im.width == width and im.height >= height  # the colour bar goes below
            rgb = np.asarray(im.convert("RGB")).astype(int)
        assert o["note"] is not None or (rgb[..., 0] != rgb[..., 2]).any()  # a map is drawn in colour
