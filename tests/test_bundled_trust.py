"""The shipped model's trust fields: calibrator, operating point and input check are in the
bundle; non-radiographs are warned, real held-out radiographs are not; the int8 ONNX file
agrees. Held-out radiographs: tests/data/nih-mini's test_list (all in the sample's official
test part, never seen in training) and the packaged samples; more with CHESTXRAY_SAMPLE_ROOT."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from chestxray.data.images import read_image
from chestxray.inference.predict import Analyzer

sys.path.insert(0, str(Path(__file__).parent))
from ood_inputs import altered_radiographs, non_radiographs

SAMPLE_ROOT = os.environ.get("CHESTXRAY_SAMPLE_ROOT")


@pytest.fixture(scope="module")
def analyzer():
    return Analyzer.load()


def _held_out(mini_root: Path) -> list[tuple[str, np.ndarray]]:
    names = (mini_root / "test_list.txt").read_text().split()
    return [(n, read_image(mini_root / "images" / n)) for n in names]


def _checks(an: Analyzer, items) -> np.ndarray:
    """Each image's record of the checks (Analyzer.run): input score and orientation."""
    out = []
    for i in range(0, len(items), 16):
        out.append(an.run(np.stack([an.preprocess(g)[1] for _, g in items[i : i + 16]]))[1])
    return np.concatenate(out)


def _scores(an: Analyzer, items) -> np.ndarray:
    return _checks(an, items)["score"]


def _warned(an: Analyzer, items) -> np.ndarray:
    """Warned by either check (what predict's warnings list shows, DICOM headers aside)."""
    c = _checks(an, items)
    return (c["score"] > an.meta.input_check["cutoff"]) | (c["turn"] != 0)


def test_bundled_model_carries_calibrator_policy_and_input_check(analyzer):
    meta = analyzer.meta
    assert meta.calibration["method"] == "temperature"
    assert meta.operating_point["policy"] == analyzer.threshold_policy == "f1"
    per = meta.operating_point["per_finding"]
    assert all(0 <= per[lab]["sensitivity"] <= 1 and 0 <= per[lab]["specificity"] <= 1 for lab in meta.labels)
    assert meta.training["tuning"]["weights"].startswith("unchanged")
    assert [p["layer"] for p in meta.input_check["parts"]] == ["head", "backbone.layer1"]
    assert meta.orientation["size"] == 32 and len(meta.orientation["template"]) == 32 * 32


@pytest.mark.slow
def test_non_radiographs_are_warned_and_held_out_radiographs_are_not(analyzer, mini_root):
    pytest.importorskip("skimage")  # test-only dependency (the `dev` extra)
    from chestxray.samples import sample_images

    cutoff = analyzer.meta.input_check["cutoff"]
    non = _scores(analyzer, non_radiographs())
    assert len(non) >= 25 and np.mean(non > cutoff) >= 0.95
    real = _held_out(mini_root) + [(p.name, read_image(p)) for p in sample_images()]
    assert np.mean(_warned(analyzer, real)) <= 0.05  # by either check
    altered = _warned(analyzer, altered_radiographs(real[:10]))
    # Inverted and 90-degree-turned films are warned (the orientation check catches the turns).
    assert np.mean(altered[0::2]) >= 0.9 and np.mean(altered[1::2]) >= 0.9
    turned = analyzer.predict(np.rot90(real[0][1], 3))
    assert turned.warnings and "turned 90 degrees clockwise" in turned.warnings[0]
    # Warnings reach predict's output, next to findings that are still given.
    photo = non_radiographs()[0][1]
    pred = analyzer.predict(photo)
    assert pred.ok and len(pred.findings) == 14 and "unlike the frontal chest X-rays" in pred.warnings[0]


@pytest.mark.slow
def test_int8_onnx_agrees_with_the_bundle(analyzer, mini_root):
    pytest.importorskip("onnxruntime")
    from chestxray.inference.onnx_backend import default_onnx_path

    onnx = Analyzer.load(default_onnx_path())
    assert (
        onnx.meta.calibration == analyzer.meta.calibration and onnx.thresholds.tolist() == analyzer.thresholds.tolist()
    )
    real = _held_out(mini_root)[:16]
    batch = np.stack([analyzer.preprocess(g)[1] for _, g in real])
    (pt, st), (po, so) = analyzer.run(batch), onnx.run(batch)
    assert np.abs(po - pt).max() < 0.03  # int8 quantisation error
    cutoff = analyzer.meta.input_check["cutoff"]
    assert np.array_equal(so["score"] > cutoff, st["score"] > cutoff)
    assert onnx.meta.orientation == analyzer.meta.orientation and np.array_equal(so["turn"], st["turn"])


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE_ROOT, reason="set CHESTXRAY_SAMPLE_ROOT to the 1,350-image NIH sample")
def test_sample_test_part_is_rarely_warned(analyzer):
    from chestxray.data.index import load_nih

    index = load_nih(SAMPLE_ROOT)
    pos = index.split_positions("test")
    items = [(n, read_image(p)) for n, p in zip(index.frame["image"].iloc[pos], index.frame["path"].iloc[pos])]
    assert np.mean(_warned(analyzer, items)) <= 0.05
