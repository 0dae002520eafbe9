"""Regression tests for inputs and set-ups that once crashed or misreported."""

import io
import json
import logging

import numpy as np
import pytest

from chestxray.cli import main
from chestxray.data.images import read_image
from chestxray.errors import ImageReadError


def _dicom_bytes(transfer_syntax: str = "1.2.840.10008.1.2.1") -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.PatientName = "DOE^JANE"
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    # Same length, so offsets stay valid: an unknown (private) transfer syntax.
    return data.replace(b"1.2.840.10008.1.2.1", transfer_syntax.encode())


def test_unknown_transfer_syntax_is_a_clean_error_and_logs_nothing(caplog):
    assert read_image(_dicom_bytes(), name="ok.dcm").shape == (8, 8)
    with caplog.at_level(logging.DEBUG), pytest.raises(ImageReadError, match=r"bad\.dcm"):
        read_image(_dicom_bytes("1.2.840.10008.9.9.9"), name="bad.dcm")
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]


def test_mutated_dicom_headers_never_escape_as_other_errors():
    base = bytearray(_dicom_bytes())
    rng = np.random.default_rng(0)
    outcomes = {"read": 0, "refused": 0}
    for _ in range(300):
        data = bytearray(base)
        for i in rng.integers(132, len(data) - 64, size=3):
            data[i] = int(rng.integers(0, 256))
        try:  # any other exception type fails the test
            image = read_image(bytes(data), name="fuzz.dcm")
            assert image.dtype == np.uint8 and image.ndim == 2
            outcomes["read"] += 1
        except ImageReadError as exc:
            assert "fuzz.dcm" in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["read"] > 0  # the mutations hit both ways


def test_batch_with_a_broken_dicom_still_finishes(tiny_bundle, tmp_path, original_png, capsys):
    (tmp_path / "bad.dcm").write_bytes(_dicom_bytes("1.2.840.10008.9.9.9"))
    rc = main(
        ["predict", "--model", str(tiny_bundle), str(tmp_path / "bad.dcm"), str(original_png), "--format", "json"]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert out[0]["error"] and out[0]["findings"] == []
    assert out[1]["error"] is None and len(out[1]["findings"]) == 14


def test_evaluate_follows_the_bundle_label_order(tmp_path, mini_root):
    """A bundle whose labels are in another order must be scored against the right columns."""
    import torch

    from chestxray.data.index import load_nih
    from chestxray.evaluation.evaluate import split_probabilities
    from chestxray.inference.predict import Analyzer
    from chestxray.labels import FINDINGS
    from chestxray.models.bundle import BundleMeta, save_bundle
    from chestxray.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", weights="none", freeze="all", image_size=32).eval()
    meta = BundleMeta("resnet18", list(FINDINGS), model.preprocessing, [0.5] * 14)
    a = Analyzer.load(save_bundle(model, meta, tmp_path / "a.safetensors"))
    # The same network with its output rows and label list reversed.
    with torch.no_grad():
        model.backbone.fc.weight.copy_(model.backbone.fc.weight.flip(0))
        model.backbone.fc.bias.copy_(model.backbone.fc.bias.flip(0))
    meta_r = BundleMeta("resnet18", list(reversed(FINDINGS)), model.preprocessing, [0.5] * 14)
    b = Analyzer.load(save_bundle(model, meta_r, tmp_path / "b.safetensors"))
    index = load_nih(mini_root)
    pa, ta, _, _ = split_probabilities(a, index, "test")
    pb, tb, _, _ = split_probabilities(b, index, "test")
    np.testing.assert_allclose(pb[:, ::-1], pa, atol=1e-6)
    np.testing.assert_array_equal(tb[:, ::-1], ta)


def test_evaluate_with_no_defined_auroc_says_undefined(tmp_path, tiny_bundle, mini_root, capsys):
    # A validation split of a single "No Finding" patient: no finding has a positive.
    from chestxray.data.index import load_nih

    for seed in range(50):
        index = load_nih(mini_root, val_fraction=0.02, seed=seed)
        val = index.split_positions("val")
        if index.labels[val].sum() == 0:
            break
    else:
        pytest.skip("no all-negative validation carve found")
    rc = main(
        [
            "evaluate",
            "--model",
            str(tiny_bundle),
            str(mini_root),
            "--split",
            "val",
            "--val-fraction",
            "0.02",
            "--split-seed",
            str(seed),
            "--bootstrap",
            "10",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert "macro AUROC undefined" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["macro"]["auroc"] is None


def test_api_validation_errors_are_one_string(tiny_bundle, original_png):
    from fastapi.testclient import TestClient

    from chestxray.inference.predict import Analyzer
    from chestxray.serve.app import create_app

    client = TestClient(create_app(Analyzer.load(tiny_bundle)))
    r = client.post("/api/v1/cam", files={"file": ("x.png", original_png.read_bytes())})
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], str) and "finding" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_server_reads_dicom_without_the_part10_preamble(tiny_bundle):
    import pydicom
    from fastapi.testclient import TestClient
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from chestxray.inference.predict import Analyzer
    from chestxray.serve.app import create_app

    ds = pydicom.dcmread(io.BytesIO(_dicom_bytes()))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)  # the bare dataset: no preamble, no "DICM", no file meta group
    data = fp.getvalue()
    assert b"DICM" not in data and not data.startswith(b"\x02\x00")
    np.testing.assert_array_equal(read_image(data, name="bare.dcm"), read_image(_dicom_bytes(), name="full.dcm"))
    client = TestClient(create_app(Analyzer.load(tiny_bundle)))
    r = client.post("/api/v1/predict", files={"file": ("x", data)})
    assert r.status_code == 200 and len(r.json()["findings"]) == 14
    r = client.post("/api/v1/predict", files={"file": ("x", b"just some text, not an image")})
    assert r.status_code == 415


def test_cuda_requested_without_cuda_is_a_clean_error(mini_root, capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", str(mini_root), "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert (
        main(
            [
                "train",
                str(mini_root),
                "--out",
                str(tmp_path / "run"),
                "--device",
                "cuda",
                "--weights",
                "none",
                "--freeze",
                "all",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("CUDA") >= 2 and "Traceback" not in err
