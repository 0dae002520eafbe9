"""`chestxray predict`: output shapes, ordering, thresholds, DICOM, broken files, --cam."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.cli import main
from chestxray.data.images import read_image
from chestxray.errors import ChestXrayError
from chestxray.inference.predict import Analyzer
from chestxray.labels import FINDINGS

EXAMPLE = Path(__file__).parent.parent / "examples" / "00013125_000.png"
BUNDLE_THRESHOLDS = dict(zip(FINDINGS, np.linspace(0.3, 0.7, len(FINDINGS))))  # as conftest builds them

# One torch thread per test module (see conftest.single_torch_thread).
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def analyzer(tiny_bundle):
    return Analyzer.load(tiny_bundle)


def check_record(rec: dict, model: str = "tiny-test-model") -> None:
    assert [k for k in rec if k != "overlays"] == [
        "file", "model", "variant", "findings", "error", "warnings", "threshold_policy"
    ]  # fmt: skip
    assert rec["model"] == model and rec["error"] is None and rec["variant"] == "pytorch float32"
    assert sorted(f["finding"] for f in rec["findings"]) == sorted(FINDINGS)
    flags = [f["positive"] for f in rec["findings"]]
    assert flags == sorted(flags, reverse=True), "positives first"
    for group in (True, False):
        probs = [f["probability"] for f in rec["findings"] if f["positive"] is group]
        assert probs == sorted(probs, reverse=True)
    for f in rec["findings"]:
        assert list(f) == ["finding", "probability", "threshold", "positive"]
        assert f["threshold"] == pytest.approx(BUNDLE_THRESHOLDS[f["finding"]])
        assert 0.0 <= f["probability"] <= 1.0
        assert f["positive"] is (f["probability"] >= f["threshold"])


def test_json_for_files_and_folders(capsys, tiny_bundle, sample_images, tmp_path, analyzer):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    for p in sample_images[:2]:
        (nested / p.name).write_bytes(p.read_bytes())
    (tmp_path / "a" / "notes.txt").write_text("not an image, not collected")
    code, out, err = run_cli(
        capsys,
        "predict",
        "--model",
        str(tiny_bundle),
        "--format",
        "json",
        str(EXAMPLE),
        str(tmp_path / "a"),
        str(sample_images[2]),
    )
    assert code == 0, err
    data = json.loads(out)
    assert [r["file"] for r in data] == [
        str(EXAMPLE),
        *(str(nested / p.name) for p in sample_images[:2]),
        str(sample_images[2]),
    ]
    for rec in data:
        check_record(rec)
    want = analyzer.predict(sample_images[2])
    got = {f["finding"]: f["probability"] for f in data[-1]["findings"]}
    assert all(got[f.finding] == pytest.approx(f.probability, abs=1e-6) for f in want.findings)
    assert "tiny-test-model" in err and NOT_FOR_CLINICAL_USE in err


def test_csv_and_table_match_json(capsys, tiny_bundle, sample_images, tmp_path):
    files = [str(p) for p in sample_images[:3]]
    _, js, _ = run_cli(capsys, "predict", "--model", str(tiny_bundle), "--format", "json", *files)
    data = json.loads(js)
    code, csv_text, _ = run_cli(capsys, "predict", "--model", str(tiny_bundle), "--format", "csv", *files)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert list(rows[0]) == [
        "file", "model", "variant", "finding", "probability", "threshold", "positive", "error", "warnings"
    ]  # fmt: skip
    assert len(rows) == 3 * 14
    for rec in data:
        mine = [r for r in rows if r["file"] == rec["file"]]
        assert [r["finding"] for r in mine] == [f["finding"] for f in rec["findings"]]
        for r, f in zip(mine, rec["findings"]):
            assert float(r["probability"]) == pytest.approx(f["probability"], abs=1e-6)
            assert r["positive"] == ("true" if f["positive"] else "false") and r["error"] == ""
            assert r["warnings"] == "; ".join(rec["warnings"])  # the tiny bundle has no checks: empty
    code, table, _ = run_cli(capsys, "predict", "--model", str(tiny_bundle), *files)
    assert code == 0
    assert "tiny-test-model" in table and NOT_FOR_CLINICAL_USE in table
    assert all(f in table for f in files)
    assert table.count(" YES") == sum(f["positive"] for rec in data for f in rec["findings"])
    # --out writes the file and nothing to stdout
    target = tmp_path / "out" / "pred.csv"
    code, out, err = run_cli(
        capsys, "predict", "--model", str(tiny_bundle), "--format", "csv", "--out", str(target), *files
    )
    assert code == 0 and out == "" and str(target) in err
    assert target.read_text() == csv_text


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom complains about the junk DICOM
def test_broken_files_are_reported_and_the_rest_finish(capsys, tiny_bundle, sample_images, tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    good = [folder / p.name for p in sample_images[:3]]
    for src, dst in zip(sample_images, good):
        dst.write_bytes(src.read_bytes())
    data = sample_images[3].read_bytes()
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("this is not a radiograph\n")
    (folder / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 50)
    missing = tmp_path / "does-not-exist.png"
    code, out, err = run_cli(
        capsys, "predict", "--model", str(tiny_bundle), "--format", "json", str(folder), str(missing)
    )
    assert code == 1
    records = {Path(r["file"]).name: r for r in json.loads(out)}
    assert len(records) == 3 + 4 + 1
    for p in good:
        check_record(records[p.name])
    reasons = {
        n: records[n]["error"] for n in ("empty.png", "truncated.png", "text.jpg", "junk.dcm", "does-not-exist.png")
    }
    assert reasons["empty.png"] == "empty file"
    assert "truncated" in reasons["truncated.png"]
    assert "not a PNG, JPEG or DICOM" in reasons["text.jpg"]
    assert "DICOM" in reasons["junk.dcm"]
    assert reasons["does-not-exist.png"] == "file not found"
    for name in reasons:
        assert records[name]["findings"] == [] and records[name]["model"] == "tiny-test-model"
        assert name in err
    assert "5 of 8 files could not be read" in err
    # the same in CSV: one row with the error per failed file
    code, out, _ = run_cli(capsys, "predict", "--model", str(tiny_bundle), "--format", "csv", str(folder))
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 1
    assert {r["file"] for r in rows if r["error"]} == {str(folder / n) for n in reasons if n != "does-not-exist.png"}
    # and in the table
    code, out, _ = run_cli(capsys, "predict", "--model", str(tiny_bundle), str(folder / "empty.png"), str(good[0]))
    assert code == 1 and "error: empty file" in out


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_gives_the_same_findings_as_the_png(capsys, tiny_bundle, mini_root, tmp_path, analyzer):
    png = mini_root / "images" / "00000506_013.png"
    gray = read_image(png)
    assert gray.min() == 0 and gray.max() == 255  # full range: DICOM's windowing is then the identity
    folder = tmp_path / "dicom"
    folder.mkdir()
    _write_dicom(folder / "mono2.dcm", gray, "MONOCHROME2")
    _write_dicom(folder / "mono1.dcm", 255 - gray, "MONOCHROME1")  # inverted storage
    (folder / "same.png").write_bytes(png.read_bytes())
    code, out, err = run_cli(capsys, "predict", "--model", str(tiny_bundle), "--format", "json", str(folder))
    assert code == 0, err
    recs = {Path(r["file"]).name: r for r in json.loads(out)}
    assert set(recs) == {"mono1.dcm", "mono2.dcm", "same.png"}
    ref = {f["finding"]: f for f in recs["same.png"]["findings"]}
    for name in ("mono2.dcm", "mono1.dcm"):
        check_record(recs[name])
        assert [f["finding"] for f in recs[name]["findings"]] == [f["finding"] for f in recs["same.png"]["findings"]]
        for f in recs[name]["findings"]:
            assert f["probability"] == pytest.approx(ref[f["finding"]]["probability"], abs=1e-6)
            assert f["positive"] == ref[f["finding"]]["positive"]
    # An inverted MONOCHROME2 (what a reader ignoring MONOCHROME1 would see) is not the same.
    _write_dicom(tmp_path / "wrong.dcm", 255 - gray, "MONOCHROME2")
    wrong = analyzer.predict(tmp_path / "wrong.dcm")
    assert max(abs(f.probability - ref[f.finding]["probability"]) for f in wrong.findings) > 1e-4


@pytest.mark.slow
def test_cam_overlays_at_original_size(capsys, tiny_bundle, mini_root, tmp_path):
    originals = [EXAMPLE, mini_root / "originals" / "00027426_000.png"]  # 1024 and 512 px
    cam_dir = tmp_path / "cams"
    code, out, err = run_cli(
        capsys,
        "predict",
        "--model",
        str(tiny_bundle),
        "--format",
        "json",
        "--cam",
        str(cam_dir),
        "--findings",
        "Cardiomegaly,infiltrate",
        *map(str, originals),
    )
    assert code == 0, err
    data = json.loads(out)
    files = sorted(p.name for p in cam_dir.iterdir())
    want = []
    for rec, src in zip(data, originals):
        check_record(rec)
        probs = {f["finding"]: f["probability"] for f in rec["findings"]}
        for finding in ("Cardiomegaly", "Infiltration"):
            name = f"{src.stem}_png_{finding}_{probs[finding]:.2f}.png"
            want.append(name)
            with Image.open(cam_dir / name) as im, Image.open(src) as orig:
                # Original width; the colour bar adds a strip below (unless the map is empty).
                assert im.mode == "RGB" and im.width == orig.width and im.height >= orig.height
        # The JSON names each overlay's file.
        assert [(o["finding"], Path(o["path"]).name) for o in rec["overlays"]] == [
            (f, f"{src.stem}_png_{f}_{probs[f]:.2f}.png") for f in ("Cardiomegaly", "Infiltration")
        ]
    assert files == sorted(want)
    assert f"wrote 4 Grad-CAM overlays to {cam_dir.resolve()}" in err
    # Without --findings: the positives, or the most probable finding when none is positive.
    cam_dir2 = tmp_path / "cams2"
    code, out, _ = run_cli(
        capsys, "predict", "--model", str(tiny_bundle), "--format", "json", "--cam", str(cam_dir2), str(EXAMPLE)
    )
    rec = json.loads(out)[0]
    expected = [f for f in rec["findings"] if f["positive"]] or rec["findings"][:1]
    assert sorted(p.name for p in cam_dir2.iterdir()) == sorted(
        f"{EXAMPLE.stem}_png_{f['finding']}_{f['probability']:.2f}.png" for f in expected
    )


def test_cam_names_stay_unique_visibly_and_broken_files_are_skipped(capsys, tiny_bundle, sample_images, tmp_path):
    """a.png and a.dcm, and x/scan.png and y/scan.png, get overlay names that say which
    input they belong to (no silent "-2")."""
    from chestxray.commands.predict import overlay_names

    for sub in ("x", "y"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        (tmp_path / "in" / sub / "scan.png").write_bytes(sample_images[0].read_bytes())
    (tmp_path / "in" / "scan.jpg").write_bytes(_jpeg(sample_images[1]))
    (tmp_path / "in" / "bad.png").write_bytes(b"")
    code, out, err = run_cli(
        capsys,
        "predict",
        "--model",
        str(tiny_bundle),
        "--cam",
        str(tmp_path / "cams"),
        "--findings",
        "Mass",
        "--format",
        "json",
        str(tmp_path / "in"),
    )
    assert code == 1 and "bad.png" in err
    names = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert [n.rsplit("_Mass_", 1)[0] for n in names] == ["scan_jpg", "x_scan_png", "y_scan_png"]
    listed = {Path(r["file"]).relative_to(tmp_path / "in").as_posix(): r.get("overlays") for r in json.loads(out)}
    assert listed["bad.png"] is None
    assert Path(listed["x/scan.png"][0]["path"]).name.startswith("x_scan_png_Mass_")
    assert overlay_names([Path("a/x.png"), Path("b/x.png"), Path("x.dcm")]) == {
        "a/x.png": "a_x_png",
        "b/x.png": "b_x_png",
        "x.dcm": "x_dcm",
    }


def _jpeg(png: Path) -> bytes:
    buf = io.BytesIO()
    with Image.open(png) as im:
        im.convert("L").save(buf, format="JPEG")
    return buf.getvalue()


def test_argument_errors_exit_2_with_a_message(capsys, tiny_bundle, sample_images, tmp_path):
    img = str(sample_images[0])
    code, _, err = run_cli(
        capsys, "predict", "--model", str(tiny_bundle), "--cam", str(tmp_path / "c"), "--findings", "Heartache", img
    )
    assert code == 2 and "Heartache" in err and "Cardiomegaly" in err
    code, _, err = run_cli(capsys, "predict", "--model", str(tiny_bundle), "--findings", "Mass", img)
    assert code == 2 and "--cam" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "predict", "--model", str(tiny_bundle), str(tmp_path / "empty"))
    assert code == 2 and "no images" in err
    code, _, err = run_cli(capsys, "predict", "--model", str(tmp_path / "nope.safetensors"), img)
    assert code == 2 and "nope.safetensors" in err
    import torch

    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "predict", "--model", str(tiny_bundle), "--device", "cuda", img)
        assert code == 2 and "no CUDA device" in err
    with pytest.raises(SystemExit):
        main(["predict", "--batch-size", "0", img])
    assert "at least 1" in capsys.readouterr().err


def test_no_model_means_the_bundled_default(capsys, sample_images):
    from chestxray.errors import BundleError
    from chestxray.inference.predict import default_bundle_path

    code, out, err = run_cli(capsys, "predict", "--format", "json", str(sample_images[0]))
    try:
        default_bundle_path()
    except BundleError as exc:
        assert code == 2 and str(exc) in err
    else:
        assert code == 0 and json.loads(out)[0]["error"] is None


def test_batch_size_does_not_change_results(capsys, tiny_bundle, sample_images):
    files = [str(p) for p in sample_images[:5]]
    _, a, _ = run_cli(capsys, "predict", "--model", str(tiny_bundle), "--format", "json", "--batch-size", "2", *files)
    _, b, _ = run_cli(capsys, "predict", "--model", str(tiny_bundle), "--format", "json", "--batch-size", "16", *files)
    for ra, rb in zip(json.loads(a), json.loads(b)):
        assert [f["finding"] for f in ra["findings"]] == [f["finding"] for f in rb["findings"]]
        assert np.allclose(
            [f["probability"] for f in ra["findings"]], [f["probability"] for f in rb["findings"]], atol=1e-5
        )


def test_command_modules_import_without_torch():
    code = (
        "import sys; import chestxray.commands.predict, chestxray.commands.report; "
        "bad = [m for m in ('torch', 'matplotlib', 'pandas') if m in sys.modules]; print(bad)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_inputs_in_memory_take_the_pipeline_path_of_files(analyzer, sample_images, tmp_path):
    """Bytes, gray arrays and named paths, streamed from a generator, give what the files give;
    a broken one is an error row under its name; a names list of the wrong length is refused."""
    paths = [str(p) for p in sample_images[:3]]

    def probs(preds):  # a batch's make-up moves float32 results in the last digits
        return [pytest.approx({f.finding: f.probability for f in p.findings}, abs=1e-5) for p in preds]

    want = probs(analyzer.predict(paths))
    mixed = (x for x in [Path(paths[0]).read_bytes(), read_image(paths[1]), paths[2], b"not an image"])
    got = analyzer.predict_many(mixed)
    assert [p.file for p in got] == ["<input 0>", "<input 1>", paths[2], "<input 3>"]
    assert [{f.finding: f.probability for f in p.findings} for p in got[:3]] == want
    assert got[3].error and not got[3].findings
    named = analyzer.predict_many([paths[0], Path(paths[1]).read_bytes()], names=["a", "b"], workers=2)
    assert [p.file for p in named] == ["a", "b"]
    assert [{f.finding: f.probability for f in p.findings} for p in named] == want[:2]
    with pytest.raises(ChestXrayError, match="2 inputs but 1 names"):
        analyzer.predict_many(paths[:2], names=["a"])
    emb = analyzer.embed([paths[0], b"junk"])
    assert emb.files == [paths[0], "<input 1>"] and list(emb.errors) == [1]
    assert np.isnan(emb.vectors[1]).all() and np.isfinite(emb.vectors[0]).all()
