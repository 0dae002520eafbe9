"""ONNX export, the torch-free onnx backend, int8 quantization and the AUROC comparison.

One float32 and one int8 export of the tiny bundle (resnet18, 64 px, random weights) are
shared by the module; parity is checked on real NIH images from the repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chestxray.cli import main
from chestxray.errors import BundleError, ChestXrayError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory) -> tuple[Path, dict]:
    """`chestxray export` of the tiny bundle: (file, the command's JSON summary)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    rc, stdout, stderr = run_cli(["export", "--model", str(tiny_bundle), "--onnx", str(out), "--json"])
    assert rc == 0, stderr
    return out, json.loads(stdout)


@pytest.fixture(scope="module")
def exported_int8(tiny_bundle, mini_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx8") / "tiny.int8.onnx"
    rc, stdout, stderr = run_cli(
        [
            "export",
            "--model",
            str(tiny_bundle),
            "--onnx",
            str(out),
            "--json",
            "--int8",
            "--calibration",
            str(mini_root / "images"),
            "--calibration-count",
            "24",
        ]
    )
    assert rc == 0, stderr
    return out, json.loads(stdout)


@pytest.fixture(scope="module")
def torch_model(tiny_bundle):
    from chestxray.models.bundle import load_bundle

    return load_bundle(tiny_bundle)


def torch_probs(model, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return torch.sigmoid(model(torch.from_numpy(batch))).numpy()


def preset_batch(paths, preprocessing) -> np.ndarray:
    from chestxray.data.images import read_image
    from chestxray.data.transforms import EvalPreset

    return EvalPreset(preprocessing).batch([read_image(p) for p in paths])


# --- export: file, metadata, parity ------------------------------------------------------


def test_export_writes_one_checked_file(exported):
    path, summary = exported
    assert path.is_file() and summary["bytes"] == path.stat().st_size
    assert not [p for p in path.parent.iterdir() if p != path], "atomic write left temporary files"
    parity = summary["parity"]
    assert parity["tolerance"] == TOL
    assert 0 <= parity["max_abs_diff"] <= TOL
    assert parity["batch_sizes"] == [4, 1] and len(parity["images"]) == 4  # the packaged real samples
    assert parity["agree"] == parity["pairs"] == 4 * 14
    assert summary["quantization"].startswith("none")


def test_metadata_round_trip(exported, tiny_bundle):
    from chestxray.inference.onnx_backend import read_onnx_info
    from chestxray.models.bundle import read_bundle_meta

    path, summary = exported
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    bundle_meta = read_bundle_meta(tiny_bundle)
    assert json.loads(props["chestxray"]) == json.loads(bundle_meta.to_json())
    assert props["format"] == "chestxray-onnx" and props["name"] == "tiny-test-model"
    assert props["architecture"] == "resnet18"
    assert json.loads(props["labels"]) == bundle_meta.labels
    assert list(json.loads(props["thresholds"]).values()) == pytest.approx(bundle_meta.thresholds)
    assert json.loads(props["preprocessing"])["size"] == 64
    assert "sigmoid applied" in props["output"]
    assert json.loads(props["parity"])["max_abs_diff"] == summary["parity"]["max_abs_diff"]
    source = json.loads(props["source_bundle"])
    assert source["sha256"] == hashlib.sha256(Path(tiny_bundle).read_bytes()).hexdigest()
    assert json.loads(props["exported"])["opset"] == 18
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
    # Read back the way the torch-free backend does (onnxruntime only).
    info = read_onnx_info(path)
    assert info.meta.labels == bundle_meta.labels
    assert info.meta.thresholds == pytest.approx(bundle_meta.thresholds)
    assert info.meta.preprocessing == bundle_meta.preprocessing
    assert info.meta.name == bundle_meta.name and info.quantization.startswith("none")


def test_graph_has_dynamic_batch_and_named_io(exported):
    model = onnx.load(str(exported[0]))
    (inp,), (out, feats, cam) = model.graph.input, model.graph.output
    assert inp.name == "image" and out.name == "probabilities" and feats.name == "features" and cam.name == "cam"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 64, 64]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 14]
    assert [d.dim_param or d.dim_value for d in feats.type.tensor_type.shape.dim] == ["batch", 512]  # resnet18
    assert [d.dim_param or d.dim_value for d in cam.type.tensor_type.shape.dim] == ["batch", 14, 2, 2]  # 64 px / 32


@pytest.mark.parametrize("n", [1, 3])
def test_parity_on_repo_images(exported, torch_model, sample_images, original_png, rgba_png, n):
    """onnxruntime vs PyTorch on real NIH images (256 px subset, a 1024 px original, an RGBA
    original) at batch 1 and 3: probabilities within 1e-4."""
    model, meta = torch_model
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    paths = [original_png, rgba_png, *sample_images]
    batch = preset_batch(paths, meta.preprocessing)
    for start in range(0, len(batch) - n + 1, n):
        x = batch[start : start + n]
        got = session.run(None, {"image": x})[0]
        assert got.shape == (n, 14)
        np.testing.assert_allclose(got, torch_probs(model, x), atol=TOL, rtol=0)
    # The sigmoid is in the graph: outputs are probabilities, not logits.
    got = session.run(None, {"image": batch})[0]
    assert got.min() > 0 and got.max() < 1


def test_analyzer_onnx_gives_the_same_findings_as_torch(exported, tiny_bundle, sample_images, original_png):
    from chestxray.inference.predict import Analyzer

    fast = Analyzer.load(exported[0], backend="onnx", batch_size=4)
    ref = Analyzer.load(tiny_bundle, backend="torch", batch_size=4)
    assert fast.backend.name == "onnx" and fast.name == ref.name == "tiny-test-model"
    assert fast.labels == ref.labels and np.allclose(fast.thresholds, ref.thresholds)
    inputs = [*sample_images, original_png, REPO / "examples" / "00013125_000.png"]
    got, want = fast.predict(inputs), ref.predict(inputs)
    assert len(got) == len(inputs) == len(want)
    any_positive = False
    for g, w in zip(got, want):
        assert g.ok and w.ok and g.file == w.file
        assert [f.finding for f in g.positives] == [f.finding for f in w.positives]
        any_positive |= bool(g.positives)
        for f in w.findings:
            assert g.probability(f.finding) == pytest.approx(f.probability, abs=TOL)
    assert any_positive  # the per-class thresholds make some findings positive: a real comparison
    single = fast.predict(original_png)
    assert single.to_dict()["findings"][0]["finding"] == got[len(sample_images)].findings[0].finding


@pytest.mark.slow
def test_onnx_gradcam_is_torch_gradcam(exported, tiny_bundle, original_png, sample_images):
    """The graph's class activation maps, upsampled with numpy, give the torch backend's Grad-CAM
    overlays (every finding, original size) to 1e-4, and the same probabilities and findings;
    the export's own check measured the same."""
    from chestxray.inference.explain import explain_image
    from chestxray.inference.predict import Analyzer

    assert exported[1]["parity"]["cam_max_abs_diff"] <= TOL
    fast = Analyzer.load(exported[0], backend="onnx")
    ref = Analyzer.load(tiny_bundle, backend="torch")
    assert fast.backend.has_cam
    every = list(ref.labels)
    for image in (original_png, sample_images[0]):
        gray_o, pred_o, cams_o = explain_image(fast, image, every)
        gray_t, pred_t, cams_t = explain_image(ref, image, every)
        assert np.array_equal(gray_o, gray_t) and len(cams_o) == len(cams_t) == 14
        for co, ct in zip(cams_o, cams_t):
            assert co.finding == ct.finding and co.heatmap.shape == ct.heatmap.shape == gray_t.shape
            assert np.abs(co.heatmap - ct.heatmap).max() <= TOL, co.finding
            assert co.probability == pytest.approx(ct.probability, abs=TOL)
        assert [f.finding for f in pred_o.positives] == [f.finding for f in pred_t.positives]
    # The default choice (positives, or the top finding) is the same on both backends.
    assert [c.finding for c in explain_image(fast, original_png)[2]] == [
        c.finding for c in explain_image(ref, original_png)[2]
    ]


@pytest.mark.slow
def test_predict_cam_on_onnx_writes_the_torch_overlays(exported, tiny_bundle, original_png, tmp_path):
    """`predict --backend onnx --cam DIR` writes the same overlay files as the torch backend."""
    from PIL import Image

    outs = {}
    for backend, model in (("onnx", exported[0]), ("torch", tiny_bundle)):
        cams = tmp_path / backend
        rc, stdout, stderr = run_cli(
            [
                "predict",
                "--backend",
                backend,
                "--model",
                str(model),
                str(original_png),
                "--cam",
                str(cams),
                "--format",
                "json",
            ]
        )
        assert rc == 0, stderr
        outs[backend] = {o["finding"]: o["path"] for o in json.loads(stdout)[0]["overlays"]}
    assert outs["onnx"].keys() == outs["torch"].keys() and outs["onnx"]
    for finding, path in outs["onnx"].items():
        a = np.asarray(Image.open(path)).astype(int)
        b = np.asarray(Image.open(outs["torch"][finding])).astype(int)
        # Maps within 1e-4 can still round to the neighbouring colour-table entry (jet steps up to 4.5
        # levels a channel, blended at alpha 0.45, then rounded): at most 3 levels, almost every pixel equal.
        assert a.shape == b.shape and np.abs(a - b).max() <= 3 and np.mean(a == b) > 0.999


@pytest.mark.slow
def test_onnx_without_cam_output_says_how_to_get_one(tiny_bundle, tmp_path):
    """An ONNX file without the cam output (older exports, DenseNets): --cam fails before any
    work, in one line, naming the fix."""
    from cam_helpers import export_without_cam
    from chestxray.inference.predict import Analyzer

    out = export_without_cam(tiny_bundle, tmp_path / "nocam.onnx")
    assert not Analyzer.load(out, backend="onnx").backend.has_cam
    rc, _, stderr = run_cli(
        ["predict", "--model", str(out), str(REPO / "examples" / "00013125_000.png"), "--cam", str(tmp_path / "cams")]
    )
    assert rc == 2 and "cam' output" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "cams").exists()


@pytest.mark.slow
def test_bundled_model_gradcam_on_onnx_float32_and_int8(tmp_path):
    """The bundled ResNet-50 exported in float32: its ONNX Grad-CAM maps equal torch's to 1e-4
    (the export checks every finding on the packaged samples). The packaged int8 file carries
    the cam output too; its maps are int8 approximations (the last block's activations are
    quantized), so they are only required to peak in the same region for the top finding."""
    from chestxray.export.onnx import export_bundle
    from chestxray.inference.explain import explain_image, top_finding
    from chestxray.inference.onnx_backend import default_onnx_path
    from chestxray.inference.predict import Analyzer

    result = export_bundle(None, tmp_path / "fp32.onnx")
    assert result.parity.cam_max_abs_diff is not None and result.parity.cam_max_abs_diff <= TOL
    ref = Analyzer.load()
    example = REPO / "examples" / "00013125_000.png"
    for model in (tmp_path / "fp32.onnx", default_onnx_path()):
        onnx_analyzer = Analyzer.load(model, backend="onnx")
        assert onnx_analyzer.backend.has_cam
        _, _, got = explain_image(onnx_analyzer, example, select=top_finding)
        _, _, want = explain_image(ref, example, [got[0].finding])
        diff = np.abs(got[0].heatmap - want[0].heatmap).max()
        if model != default_onnx_path():
            assert diff <= TOL
        else:
            assert diff < 0.25 and np.unravel_index(np.argmax(got[0].heatmap), want[0].heatmap.shape) in set(
                zip(*np.nonzero(want[0].heatmap >= 0.75))
            )


@pytest.mark.slow
def test_export_refuses_a_graph_that_disagrees(exported, tiny_bundle, tmp_path, monkeypatch):
    """A graph whose numbers differ from PyTorch (here: the head's bias shifted, as an
    exporter bug would) fails the check; nothing is written."""
    import chestxray.export.onnx as ox

    bad = onnx.load(str(exported[0]))
    (fc_bias,) = [t for t in bad.graph.initializer if tuple(t.dims) == (14,)]
    arr = onnx.numpy_helper.to_array(fc_bias) + np.float32(0.05)
    fc_bias.CopyFrom(onnx.numpy_helper.from_array(arr, fc_bias.name))
    monkeypatch.setattr(ox, "to_onnx_model", lambda model, pre, opset: bad)
    out = tmp_path / "bad.onnx"
    rc, _, stderr = run_cli(["export", "--model", str(tiny_bundle), "--onnx", str(out)])
    assert rc == 2
    assert "disagree" in stderr and "tolerance 1e-04" in stderr and "was not written" in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_text_output_and_tolerance_flag(exported, tiny_bundle, tmp_path, monkeypatch):
    """The human-readable report names the difference; a tolerance below the measured
    difference makes the same graph fail."""
    import chestxray.export.onnx as ox

    good = onnx.load(str(exported[0]))
    monkeypatch.setattr(ox, "to_onnx_model", lambda model, pre, opset: good)
    out = tmp_path / "m.onnx"
    rc, stdout, stderr = run_cli(["export", "--model", str(tiny_bundle), "--onnx", str(out)])
    assert rc == 0, stderr
    assert "float32 check: max |p_onnx - p_torch|" in stdout and f"wrote {out}" in stdout
    assert "predict --backend onnx" in stdout
    diff = exported[1]["parity"]["max_abs_diff"]
    if diff == 0:
        pytest.skip("onnxruntime matched PyTorch bit for bit; no smaller tolerance to fail on")
    out.unlink()
    rc, _, stderr = run_cli(
        ["export", "--model", str(tiny_bundle), "--onnx", str(out), "--tolerance", f"{diff / 2:.3e}"]
    )
    assert rc == 2 and "disagree" in stderr and not out.exists()


# --- the onnx backend's errors --------------------------------------------------------------


def test_onnx_backend_errors_name_the_fix(tiny_bundle, tmp_path, exported):
    from chestxray.inference.predict import Analyzer

    with pytest.raises(BundleError, match=r"PyTorch bundle.*chestxray export"):
        Analyzer.load(tiny_bundle, backend="onnx")
    with pytest.raises(BundleError, match="no such ONNX file"):
        Analyzer.load(tmp_path / "missing.onnx", backend="onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match=r"junk\.onnx: onnxruntime cannot load"):
        Analyzer.load(tmp_path / "junk.onnx", backend="onnx")
    # A valid ONNX file that chestxray did not write: its labels and thresholds are unknown.
    plain = onnx.load(str(exported[0]))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(BundleError, match="without chestxray metadata"):
        Analyzer.load(tmp_path / "plain.onnx", backend="onnx")
    a = Analyzer.load(exported[0], backend="onnx")
    with pytest.raises(ChestXrayError, match="backend has no torch model"):
        _ = a.model
    with pytest.raises(ChestXrayError, match=r"expected a batch of shape \(N, 1, 64, 64\)"):
        a.probabilities(np.zeros((2, 1, 32, 32), np.float32))
    assert a.probabilities(np.zeros((0, 1, 64, 64), np.float32)).shape == (0, 14)


def test_onnx_backend_without_model_uses_the_packaged_one_or_says_how_to_get_one(monkeypatch):
    from chestxray.inference import onnx_backend
    from chestxray.inference.predict import Analyzer

    packaged = Analyzer.load(None, backend="onnx")
    assert packaged.backend.name == "onnx" and len(packaged.labels) == 14
    # An install without the packaged file (e.g. a trimmed wheel) explains how to make one.
    monkeypatch.setattr(onnx_backend, "DEFAULT_ONNX_NAME", "absent.onnx")
    with pytest.raises(BundleError, match=r"ships no ONNX model.*chestxray export"):
        Analyzer.load(None, backend="onnx")


def test_export_argument_errors(tiny_bundle, tmp_path):
    rc, _, err = run_cli(["export", "--model", str(tiny_bundle), "--onnx", str(tmp_path / "a.onnx"), "--int8"])
    assert rc == 2 and "--int8 needs --calibration" in err
    rc, _, err = run_cli(["export", "--model", str(tiny_bundle), "--onnx", str(tmp_path / "a.onnx"), "--opset", "17"])
    assert rc == 2 and "opset 18 or newer" in err
    rc, _, err = run_cli(["export", "--model", str(tiny_bundle), "--onnx", str(tmp_path / "a.pt")])
    assert rc == 2 and "should end in .onnx" in err
    rc, _, err = run_cli(["export", "--model", str(tmp_path / "nope.safetensors"), "--onnx", str(tmp_path / "a.onnx")])
    assert rc == 2 and "no model bundle there" in err
    assert list(tmp_path.iterdir()) == []


# --- int8 -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_export(exported_int8, exported, torch_model, sample_images):
    from chestxray.inference.onnx_backend import read_onnx_info
    from chestxray.inference.predict import Analyzer

    path, summary = exported_int8
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert path.stat().st_size < exported[0].stat().st_size / 3  # int8 weights
    assert summary["float_parity"]["max_abs_diff"] <= TOL  # float32 graph checked before quantizing
    assert summary["parity"]["tolerance"] is None  # int8 is judged by AUROC, not by 1e-4
    info = read_onnx_info(path)
    assert info.quantization.startswith("int8 static") and "24 images" in info.quantization
    # Quantized, yet close to float32 on real images: calibration on the eval preset's
    # ranges worked (an uncalibrated or mis-scaled model is off by far more than 0.05).
    model, meta = torch_model
    x = preset_batch(sample_images, meta.preprocessing)
    got = Analyzer.load(path, backend="onnx").probabilities(x)
    diff = np.abs(got - torch_probs(model, x)).max()
    assert 0 < diff < 0.05


def test_calibration_sampling(mini_root, tmp_path):
    from chestxray.export.quantize import calibration_images

    a = calibration_images(mini_root / "images", 10, seed=0)
    assert len(a) == 10 and a == calibration_images(mini_root / "images", 10, seed=0)
    assert a != calibration_images(mini_root / "images", 10, seed=1)
    assert len(calibration_images(mini_root / "images", 1000)) == 93
    with pytest.raises(ChestXrayError, match="no PNG, JPEG or DICOM"):
        calibration_images(tmp_path)
    with pytest.raises(ChestXrayError, match="not found"):
        calibration_images(tmp_path / "nope")


@pytest.mark.slow
def test_auroc_comparison_on_the_repo_test_split(exported, exported_int8, tiny_bundle, mini_root):
    """The int8 acceptance machinery, on the tiny model and the repo's 30 test images: the
    float32 ONNX file must match PyTorch's AUROC, and the numbers must be the project's
    own metric on the same predictions."""
    from chestxray.data.index import load_nih
    from chestxray.evaluation.metrics import per_class_auroc
    from chestxray.export.quantize import compare_auroc
    from chestxray.inference.predict import Analyzer

    analyzers = {
        "fp32": Analyzer.load(exported[0], backend="onnx"),
        "int8": Analyzer.load(exported_int8[0], backend="onnx"),
        "torch": Analyzer.load(tiny_bundle),
    }
    cmp = compare_auroc(analyzers, mini_root, reference="fp32")
    assert cmp.images == 30
    index = load_nih(mini_root)
    pos = index.split_positions("test")
    preds = analyzers["torch"].predict(list(index.frame["path"].iloc[pos]))
    probs = np.array([[p.probability(lab) for lab in index.pathologies] for p in preds])
    want = per_class_auroc(index.labels[pos], probs)
    got = np.array([np.nan if v is None else v for v in cmp.per_class["torch"]])
    np.testing.assert_allclose(got, want, equal_nan=True)
    assert np.isnan(want).any() and np.isfinite(want).sum() >= 5  # some findings absent from 30 images
    assert abs(cmp.loss("torch")) < 1e-3 and cmp.keep("torch")
    assert cmp.loss("int8") == pytest.approx(cmp.mean["fp32"] - cmp.mean["int8"])
    assert cmp.keep("int8") == (cmp.loss("int8") <= 0.005)
    d = cmp.to_dict()
    assert set(d["keep"]) == {"int8", "torch"} and d["reference"] == "fp32"


@pytest.mark.slow
def test_benchmark_compare_auroc_command(exported, exported_int8, tiny_bundle, mini_root):
    """The single documented command the lead runs on the real model."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "inference.py"),
            "--model",
            str(tiny_bundle),
            "--onnx",
            str(exported[0]),
            "--int8-onnx",
            str(exported_int8[0]),
            "--compare-auroc",
            str(mini_root),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["images"] == 30 and r["reference"] == "onnx-fp32"
    assert set(r["mean_auroc"]) == {"onnx-fp32", "onnx-int8", "pytorch"}
    assert abs(r["mean_auroc"]["onnx-fp32"] - r["mean_auroc"]["pytorch"]) < 1e-3
    assert r["keep"]["onnx-int8"] == (r["loss_vs_reference"]["onnx-int8"] <= 0.005)


# --- torch-free inference -------------------------------------------------------------------

BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "safetensors", "onnx", "onnxscript", "pandas", "sklearn"}:
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
from chestxray.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_imports_no_torch_and_predicts_onnx_with_torch_blocked(exported, sample_images, mini_root, tmp_path):
    """Fast guard (no new venv): with torch, onnx, pandas and sklearn made unimportable, the
    CLI still starts (every command module is torch-free at import) and predicts on ONNX."""
    script = tmp_path / "notorch.py"
    script.write_text(BLOCK_TORCH)
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "export" in proc.stdout
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "predict",
            "--backend",
            "onnx",
            "--model",
            str(exported[0]),
            str(sample_images[0]),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny-test-model" in proc.stdout and "Atelectasis" in proc.stdout
    # No --backend, no --model: the packaged int8 default.onnx, said once, in one line.
    proc = subprocess.run(
        [sys.executable, str(script), "predict", str(sample_images[0]), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "torch is not installed" in line]
    assert len(said) == 1 and "ONNX backend" in said[0] and "Traceback" not in proc.stderr
    record = json.loads(proc.stdout)[0]
    assert len(record["findings"]) == 14 and record["variant"] == "onnx int8"
    # A dataset command without pandas names the extra in one line.
    proc = subprocess.run(
        [sys.executable, str(script), "info", str(mini_root)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "chestxray[data]" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(script), "export", "--onnx", str(tmp_path / "x.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "pip install 'chestxray[torch,export]'" in proc.stderr


PIP_OFFLINE_SIGNS = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No matching distribution found",
    "ConnectTimeout",
    "ProxyError",
)


@pytest.mark.slow
def test_infer_extra_installs_and_predicts_without_torch(exported, sample_images, tmp_path):
    """`pip install .[infer]` in a fresh venv (no torch) runs `chestxray predict --backend onnx`.

    Needs the package index (pip reuses its wheel cache); skipped, saying so, only when the
    index is unreachable."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, exe = venv / "bin" / "python", venv / "bin" / "chestxray"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", f"{REPO}[infer]"], capture_output=True, text=True, timeout=900, env=env
    )
    if proc.returncode != 0 and any(s in proc.stderr for s in PIP_OFFLINE_SIGNS):
        pytest.skip(f"package index unreachable, cannot build the torch-less venv: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    proc = subprocess.run(
        [str(py), "-c", "import onnxruntime, chestxray, sys; print(chestxray.__file__)"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0 and str(venv) in proc.stdout, "chestxray must come from the venv, not the repo"
    image = sample_images[1]
    proc = subprocess.run(
        [str(exe), "predict", "--backend", "onnx", "--model", str(exported[0]), str(image), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    record = data[0] if isinstance(data, list) else data
    if "predictions" in record:
        record = record["predictions"][0]
    probs = {f["finding"]: f["probability"] for f in record["findings"]}
    assert len(probs) == 14
    # Same numbers as the full install's ONNX backend on the same file.
    from chestxray.inference.predict import Analyzer

    want = Analyzer.load(exported[0], backend="onnx").predict(image)
    for f in want.findings:
        assert probs[f.finding] == pytest.approx(f.probability, abs=1e-6)
    # Grad-CAM from the graph's cam output: overlays without torch or matplotlib.
    proc = subprocess.run(
        [
            str(exe),
            "predict",
            "--backend",
            "onnx",
            "--model",
            str(exported[0]),
            str(image),
            "--cam",
            str(tmp_path / "cams"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert list((tmp_path / "cams").glob("*.png"))
    proc = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, env=env)
    assert not [
        line for line in proc.stdout.splitlines() if line.lower().startswith(("nvidia-", "torch=", "matplotlib="))
    ]
    # A plain `chestxray predict IMG` (no --backend, no --model) runs the packaged ONNX model.
    proc = subprocess.run(
        [str(exe), "predict", str(image)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0 and "torch is not installed" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Atelectasis" in proc.stdout


# --- the model format comes from the file, not from --backend ------------------------------


def test_onnx_model_without_backend_works_in_predict_and_serve(exported, sample_images, tmp_path, monkeypatch):
    """`--model file.onnx` alone (no --backend) runs on onnxruntime in predict and serve, even
    renamed without the .onnx suffix; `--backend torch` with an ONNX file is a clear error."""
    import shutil
    import warnings

    import uvicorn

    from chestxray.inference.predict import Analyzer
    from chestxray.serve.app import create_app

    with warnings.catch_warnings():  # Starlette warns about its httpx-based client on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from fastapi.testclient import TestClient

    renamed = tmp_path / "model.bin"
    shutil.copy(exported[0], renamed)
    img = str(sample_images[0])
    want = Analyzer.load(exported[0], backend="onnx").predict(img)
    for model in (exported[0], renamed):
        rc, stdout, stderr = run_cli(["predict", "--model", str(model), img, "--format", "json"])
        assert rc == 0, stderr
        record = json.loads(stdout)[0]
        assert record["variant"] == "onnx float32" and "safetensors" not in stderr
        assert {f["finding"]: f["probability"] for f in record["findings"]} == pytest.approx(
            {f.finding: f.probability for f in want.findings}, abs=1e-6
        )
    analyzer = Analyzer.load(renamed)
    assert analyzer.backend.name == "onnx"
    with TestClient(create_app(analyzer)) as client:
        info = client.get("/api/v1/model").json()
        assert (info["backend"], info["variant"], info["grad_cam"]) == ("onnx", "onnx float32", True)  # the cam output
        r = client.post("/api/v1/predict", files={"file": ("u.png", sample_images[0].read_bytes(), "image/png")})
        assert r.status_code == 200 and r.json()["variant"] == "onnx float32"
    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: seen.update(app=server.config.app))
    rc, _, stderr = run_cli(["serve", "--model", str(exported[0]), "--port", "0"])
    assert rc == 0 and "(onnx float32)" in stderr
    assert seen["app"].state.analyzer.backend.name == "onnx"
    rc, _, stderr = run_cli(["predict", "--backend", "torch", "--model", str(exported[0]), img])
    assert rc == 2 and "this is an ONNX file; use --backend onnx" in stderr and "Traceback" not in stderr
    rc, _, stderr = run_cli(["serve", "--backend", "torch", "--model", str(renamed)])
    assert rc == 2 and "this is an ONNX file" in stderr


def test_packaged_default_onnx_is_named_int8(sample_images):
    """The packaged default.onnx is int8: every output says so beside the model name."""
    from chestxray.inference.onnx_backend import default_onnx_path
    from chestxray.inference.predict import Analyzer

    try:
        path = default_onnx_path()
    except BundleError:
        pytest.skip("this install ships no default.onnx")
    a = Analyzer.load(path)
    assert a.variant == "onnx int8" and a.backend.quantization.startswith("int8")
    rc, stdout, _ = run_cli(["predict", "--backend", "onnx", str(sample_images[0])])
    assert rc == 0 and stdout.splitlines()[0].startswith(f"model {a.name} (onnx int8):")
