"""The input check (Mahalanobis distance of pooled features), its warnings in
predict / API, DICOM header warnings, and the calibrated ONNX graph with the score output."""

import json

import numpy as np
import pytest

from chestxray.data.images import read_image
from chestxray.inference.input_check import OOD_WARNING, dicom_warnings, fit_input_check, warning_text


def test_score_is_the_mahalanobis_distance_under_ledoit_wolf():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 40)) @ rng.normal(size=(40, 40))  # rank-deficient-ish, correlated
    val, new = train[:10] + rng.normal(0, 0.1, (10, 40)), rng.normal(0, 5, (5, 40))
    other = rng.normal(size=(60, 8))
    check = fit_input_check({"head": train, "early": other}, {"head": val, "early": other[:10] + 0.1})
    head = check.parts[0]
    lw = LedoitWolf().fit(train)
    x = new - lw.location_
    exact = np.sqrt(np.einsum("ij,jk,ik->i", x, lw.precision_, x))
    np.testing.assert_allclose(head.distance(new), exact, rtol=2e-3)  # basis stored at float16
    assert head.cutoff == pytest.approx(1.1 * head.distance(val).max())
    feats = {"head": new, "early": rng.normal(size=(5, 8))}
    expected = np.maximum(
        head.distance(new) / head.cutoff, check.parts[1].distance(feats["early"]) / check.parts[1].cutoff
    )
    np.testing.assert_allclose(check.score(feats), expected)
    assert check.cutoff == 1.0 and np.all(check.score({"head": val, "early": other[:10] + 0.1}) < 1.0)
    import torch

    with torch.inference_mode():
        t = check.torch_module()({k: torch.from_numpy(v.astype(np.float32)) for k, v in feats.items()}).numpy()
    np.testing.assert_allclose(t, check.score(feats), rtol=1e-4)


def test_warning_text_and_non_finite_scores():
    assert warning_text(0.5, 1.0) is None
    assert OOD_WARNING in warning_text(1.25, 1.0) and "1.25" in warning_text(1.25, 1.0)
    assert warning_text(float("nan"), 1.0) is not None


def _dicom(path, view=None, part=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "DX", "Doe^Jane"
    if view:
        ds.ViewPosition = view
    if part:
        ds.BodyPartExamined = part
    pixels = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_header_warnings(tmp_path):
    lateral = _dicom(tmp_path / "lat.dcm", view="LL", part="CHEST")
    knee = _dicom(tmp_path / "knee.dcm", view="PA", part="KNEE")
    frontal = _dicom(tmp_path / "pa.dcm", view="PA", part="CHEST")
    assert [w.split(" ")[1] for w in dicom_warnings(lateral)] == ["ViewPosition"]
    assert "KNEE" in dicom_warnings(knee)[0] and len(dicom_warnings(knee)) == 1
    assert dicom_warnings(frontal) == [] and dicom_warnings(knee.read_bytes()) == dicom_warnings(knee)
    assert all("Doe" not in w for w in dicom_warnings(lateral) + dicom_warnings(knee))  # no identifiers
    assert dicom_warnings(np.zeros((4, 4), np.uint8)) == []


@pytest.fixture(scope="module")
def checked_bundle(tiny_bundle, mini_root, tmp_path_factory):
    """The tiny bundle re-tuned with a calibrator, an operating point and an input check."""
    from chestxray.data.index import load_nih
    from chestxray.evaluation.tune import retune_bundle

    index = load_nih(mini_root, val_fraction=0.5)
    out = tmp_path_factory.mktemp("checked") / "checked.safetensors"
    path, _ = retune_bundle(
        tiny_bundle, index, "val", out, policy="youden", calibrate="platt", input_check_split="train"
    )
    return path


@pytest.mark.slow
def test_predict_returns_warnings_and_policy(checked_bundle, sample_images, tmp_path, capsys):
    from chestxray.cli import main
    from chestxray.inference.features import pooled_features
    from chestxray.inference.input_check import load_input_check
    from chestxray.inference.predict import Analyzer
    from chestxray.models.bundle import load_bundle, read_bundle_meta

    meta = read_bundle_meta(checked_bundle)
    assert meta.input_check["cutoff"] > 0 and meta.operating_point["policy"] == "youden"
    check = load_input_check(meta, checked_bundle)
    analyzer = Analyzer.load(checked_bundle)
    noise = np.random.default_rng(0).integers(0, 256, (300, 300)).astype(np.uint8)
    batch = np.stack([analyzer.preprocess(x)[1] for x in [*sample_images[:2], noise]])
    _, checks = analyzer.run(batch)
    scores = checks["score"]
    model, _ = load_bundle(checked_bundle)
    assert check.layers == ["head", "backbone.layer1"]
    np.testing.assert_allclose(scores, check.score(pooled_features(model, batch, check.layers)[1]), rtol=1e-4)
    # A cut-off between the scores: the image above it is warned, the others not; findings still given.
    check_cut = float(np.sort(scores)[1] + np.sort(scores)[2]) / 2
    analyzer.meta.input_check["cutoff"] = check_cut
    preds = analyzer.predict([*sample_images[:2], noise])
    warned = [bool(p.warnings) for p in preds]
    assert warned == list(scores > check_cut)
    assert all(len(p.findings) == 14 and p.threshold_policy == "youden" for p in preds)
    assert main(["predict", str(sample_images[0]), "--model", str(checked_bundle), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)[0]
    assert doc["threshold_policy"] == "youden" and isinstance(doc["warnings"], list)
    # The orientation check (fitted by the same tune): a radiograph turned on its side is
    # warned as such when the feature check lets it pass; upright ones are not.
    assert meta.orientation["fitted_on"].endswith(":train (template)")
    analyzer.meta.input_check["cutoff"] = 1e9
    upright, turned = analyzer.predict([sample_images[0], np.rot90(read_image(sample_images[0]))])
    assert upright.warnings == [] and len(turned.findings) == 14
    assert len(turned.warnings) == 1 and turned.warnings[0].startswith("appears turned 90 degrees")


@pytest.mark.slow
def test_warnings_reach_csv_and_parquet_outputs(checked_bundle, sample_images, tmp_path, capsys):
    """predict --format csv, the bulk path's final CSV and Parquet: one warnings cell per
    image ('; '-joined, empty when none), the same as the JSON output's list."""
    import csv
    import io

    from PIL import Image

    from chestxray.cli import main
    from chestxray.inference.outputs import CSV_COLUMNS

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300)).astype(np.uint8)).save(noise)
    files = [str(sample_images[0]), str(noise)]
    base = ["predict", *files, "--model", str(checked_bundle), "--workers", "0"]
    assert main([*base, "--format", "json"]) == 0
    want = {d["file"]: "; ".join(d["warnings"]) for d in json.loads(capsys.readouterr().out)}
    assert want[str(noise)] and not want[str(sample_images[0])]  # noise warned, the radiograph not
    assert main([*base, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert tuple(rows[0]) == CSV_COLUMNS and CSV_COLUMNS[-1] == "warnings"
    assert {r["file"]: r["warnings"] for r in rows} == want and len(rows) == 2 * 14
    out = tmp_path / "all.csv"
    assert main([*base, "--format", "csv", "--out", str(out)]) == 0
    assert {r["file"]: r["warnings"] for r in csv.DictReader(out.open())} == want
    pq = pytest.importorskip("pyarrow.parquet")
    assert main([*base, "--format", "parquet", "--out", str(tmp_path / "all.parquet")]) == 0
    table = pq.read_table(str(tmp_path / "all.parquet")).to_pydict()
    assert {f: "; ".join(w) for f, w in zip(table["file"], table["warnings"])} == want


@pytest.mark.slow
def test_lateral_dicom_is_warned_in_predict(checked_bundle, tmp_path):
    from chestxray.inference.predict import Analyzer

    pred = Analyzer.load(checked_bundle).predict(_dicom(tmp_path / "lat.dcm", view="LATERAL"))
    assert pred.ok and any("lateral" in w for w in pred.warnings) and len(pred.findings) == 14


@pytest.mark.slow
def test_onnx_export_carries_calibration_and_score(checked_bundle, tmp_path, sample_images):
    """float32 ONNX: calibrated probabilities within 1e-5 of PyTorch, the same input score."""
    pytest.importorskip("onnxruntime")
    from chestxray.export.onnx import export_bundle
    from chestxray.inference.predict import Analyzer

    out = tmp_path / "checked.onnx"
    result = export_bundle(checked_bundle, out, tolerance=1e-5)
    assert result.parity.max_abs_diff <= 1e-5 and result.parity.score_max_rel_diff < 1e-4
    torch_a, onnx_a = Analyzer.load(checked_bundle), Analyzer.load(out)
    batch = np.stack([torch_a.preprocess(p)[1] for p in sample_images[:4]])
    (pt, st), (po, so) = torch_a.run(batch), onnx_a.run(batch)
    np.testing.assert_allclose(po, pt, atol=1e-5)
    np.testing.assert_allclose(so["score"], st["score"], rtol=1e-4)
    np.testing.assert_array_equal(so["turn"], st["turn"])  # the template travels in the ONNX metadata
    assert onnx_a.threshold_policy == "youden"
    noise = np.random.default_rng(0).integers(0, 256, (300, 300)).astype(np.uint8)
    assert torch_a.predict(noise).warnings == onnx_a.predict(noise).warnings


@pytest.mark.slow
def test_api_returns_warnings_policy_and_model_sections(checked_bundle, tmp_path):
    import warnings

    from chestxray.inference.predict import Analyzer
    from chestxray.serve.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    data = _dicom(tmp_path / "lat.dcm", view="LL", part="KNEE").read_bytes()
    with TestClient(create_app(Analyzer.load(checked_bundle))) as client:
        r = client.post("/api/v1/predict", files={"file": ("x.dcm", data, "application/dicom")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["threshold_policy"] == "youden" and len(body["findings"]) == 14
        assert any("lateral" in w for w in body["warnings"]) and any("KNEE" in w for w in body["warnings"])
        a = client.post("/api/v1/analyses", files={"file": ("x.dcm", data, "application/dicom")}).json()
        assert a["prediction"]["warnings"] == body["warnings"]
        model = client.get("/api/v1/model").json()
        assert model["operating_point"]["policy"] == "youden" and model["input_check"]["cutoff"] == 1.0
        assert model["calibration"]["method"] == "platt"
