"""Calibration measured and fitted, operating points, bundle fields, re-tuning."""

import json

import numpy as np
import pytest

from chestxray.errors import BundleError, ChestXrayError
from chestxray.evaluation.calibration import (
    brier,
    calibration_metrics,
    ece,
    fit_calibration,
    logits_of,
    reliability_bins,
)
from chestxray.evaluation.metrics import per_class_auroc
from chestxray.evaluation.thresholds import best_f1_threshold, parse_policy, policy_threshold, tune_operating_point
from chestxray.inference.calibration import Calibration, calibration_of
from chestxray.models.bundle import BundleMeta, read_bundle_meta


def _synthetic(n=4000, slope=0.5, shift=-1.0, seed=0):
    """Logits z and labels drawn from sigmoid(slope * z + shift): a known miscalibration."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, (n, 2))
    y = (rng.random((n, 2)) < 1 / (1 + np.exp(-(slope * z + shift)))).astype(float)
    return 1 / (1 + np.exp(-z)), y


def test_ece_and_brier_by_hand():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.5])
    y = np.array([0, 1, 1, 1, 0])
    # Bins (15 equal-width): {0.05, 0.05} -> |0.5 - 0.05|, {0.95, 0.95} -> |1 - 0.95|, {0.5} -> |0 - 0.5|.
    expected = (2 * 0.45 + 2 * 0.05 + 1 * 0.5) / 5
    assert ece(y, p) == pytest.approx(expected)
    assert brier(y, p) == pytest.approx(np.mean((p - y) ** 2))
    r = reliability_bins(y, p)
    assert r["count"].sum() == 5 and r["count"][0] == 2 and r["count"][14] == 2


def test_perfectly_calibrated_scores_have_small_ece():
    rng = np.random.default_rng(1)
    p = rng.random(20000)
    y = rng.random(20000) < p
    assert ece(y, p) < 0.02
    assert ece(y, np.clip(p * 0.3, 0, 1)) > 0.2


@pytest.mark.parametrize("method", ["temperature", "platt"])
def test_fitted_calibrator_lowers_ece_and_keeps_auroc(method):
    # Temperature has no intercept: it can only undo an over-confident slope.
    probs, y = _synthetic(shift=-1.0 if method == "platt" else 0.0)
    labels = ["A", "B"]
    cal = fit_calibration(probs, y, labels, method, fitted_on="synthetic")
    out = cal.apply_probabilities(probs)
    before = calibration_metrics(y, probs, labels)["macro"]["ece"]
    after = calibration_metrics(y, out, labels)["macro"]["ece"]
    assert after < before / 2
    np.testing.assert_allclose(per_class_auroc(y, out), per_class_auroc(y, probs), atol=1e-12)
    if method == "platt":  # recovers the generating slope and intercept
        np.testing.assert_allclose(cal.a, 0.5, atol=0.08)
        np.testing.assert_allclose(cal.b, -1.0, atol=0.15)
    else:
        assert np.all(cal.b == 0) and np.all(cal.a < 1)
    assert cal.info["fit_split_ece_macro"]["after"] < cal.info["fit_split_ece_macro"]["before"]


def test_class_without_positives_keeps_identity():
    probs, y = _synthetic(n=500)
    y[:, 1] = 0
    cal = fit_calibration(probs, y, ["A", "B"], "platt")
    assert cal.a[1] == 1 and cal.b[1] == 0 and cal.info["identity_for"] == ["B"]


def test_calibration_round_trip_and_rejects_bad_entries():
    cal = Calibration("platt", ["A", "B"], np.array([0.5, 2.0]), np.array([-1.0, 0.3]), {"fitted_on": "x"})
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())), ["A", "B"], "b.safetensors")
    np.testing.assert_array_equal(back.a, cal.a)
    np.testing.assert_array_equal(back.b, cal.b)
    z = np.array([[0.3, -2.0]])
    np.testing.assert_allclose(back.apply_logits(z), 1 / (1 + np.exp(-(cal.a * z + cal.b))))
    bad = cal.to_dict()
    bad["per_finding"]["A"]["a"] = -1.0
    with pytest.raises(BundleError, match="positive"):
        Calibration.from_dict(bad, ["A", "B"], "b.safetensors")
    with pytest.raises(BundleError, match="each of the 3 labels"):
        Calibration.from_dict(cal.to_dict(), ["A", "B", "C"], "b.safetensors")


def test_policies_reach_their_targets():
    rng = np.random.default_rng(3)
    y = rng.random(600) < 0.2
    s = np.clip(rng.normal(0.3 + 0.3 * y, 0.15), 0, 1)
    sens = policy_threshold(s, y, "sensitivity=0.90")
    assert sens["sensitivity"] >= 0.90 and np.mean(s[y] >= sens["threshold"]) == pytest.approx(sens["sensitivity"])
    spec = policy_threshold(s, y, "specificity=0.95")
    assert spec["specificity"] >= 0.95 and np.mean(s[~y] < spec["threshold"]) == pytest.approx(spec["specificity"])
    ppv = policy_threshold(s, y, "ppv=0.80")
    called = s >= ppv["threshold"]
    assert ppv["reached"] and y[called].mean() >= 0.80
    f1 = policy_threshold(s, y, "f1")
    assert f1["threshold"] == pytest.approx(best_f1_threshold(s, y)[0])
    youden = policy_threshold(s, y, "youden")
    j = youden["sensitivity"] + youden["specificity"] - 1
    for t in np.linspace(0.05, 0.95, 50):  # no threshold does better on J
        assert np.mean(s[y] >= t) + np.mean(s[~y] < t) - 1 <= j + 1e-12
    assert sens["threshold"] < spec["threshold"]  # a sensitive operating point sits lower


@pytest.mark.parametrize("bad", ["f2", "sensitivity", "sensitivity=1.5", "ppv=abc", "youden=0.3"])
def test_bad_policy_is_refused(bad):
    with pytest.raises(ValueError, match="threshold policy"):
        parse_policy(bad)


def test_operating_point_record():
    probs, y = _synthetic(n=400)
    y[:, 1] = 0
    thr, rec = tune_operating_point(probs, y, ["A", "B"], "sensitivity=0.9", source="unit")
    assert rec["policy"] == "sensitivity=0.9" and rec["fallback_0.5"] == ["B"] and thr[1] == 0.5
    assert rec["per_finding"]["A"]["sensitivity"] >= 0.9


def test_old_bundle_has_no_new_sections(tiny_bundle):
    meta = read_bundle_meta(tiny_bundle)
    assert meta.calibration is None and meta.operating_point is None and meta.input_check is None
    assert meta.orientation is None and calibration_of(meta) is None
    d = json.loads(meta.to_json())
    assert not {"calibration", "operating_point", "input_check", "orientation"} & set(d)
    assert BundleMeta.from_json(meta.to_json(), "x").to_json() == meta.to_json()


def test_calibrated_bundle_changes_probabilities_exactly(tiny_bundle, tmp_path, sample_images):
    """A calibrator in the bundle acts on the logits: p = sigmoid(a * z + b), in predict."""
    import torch

    from chestxray.inference.predict import Analyzer
    from chestxray.models.bundle import load_bundle, save_bundle

    model, meta = load_bundle(tiny_bundle)
    a = np.linspace(0.5, 2.0, len(meta.labels))
    b = np.linspace(-1.0, 1.0, len(meta.labels))
    meta.calibration = Calibration("platt", meta.labels, a, b).to_dict()
    path = save_bundle(model, meta, tmp_path / "cal.safetensors")
    plain, cal = Analyzer.load(tiny_bundle), Analyzer.load(path)
    batch = np.stack([plain.preprocess(p)[1] for p in sample_images[:3]])
    with torch.inference_mode():
        z = model(torch.from_numpy(batch)).double().numpy()
    np.testing.assert_allclose(cal.probabilities(batch), 1 / (1 + np.exp(-(a * z + b))), atol=1e-6)
    np.testing.assert_allclose(plain.probabilities(batch), 1 / (1 + np.exp(-z)), atol=1e-6)
    assert np.abs(cal.probabilities(batch) - plain.probabilities(batch)).max() > 0.01


def test_logits_of_inverts_sigmoid():
    z = np.array([[-5.0, 0.0, 3.0]])
    np.testing.assert_allclose(logits_of(1 / (1 + np.exp(-z))), z, atol=1e-9)


def test_tune_writes_new_thresholds_with_provenance_and_same_weights(tiny_bundle, mini_root, tmp_path, capsys):
    from safetensors.numpy import load_file

    from chestxray.cli import main

    out = tmp_path / "tuned.safetensors"
    args = ["tune", "--model", str(tiny_bundle), str(mini_root), "--split", "val", "--val-fraction", "0.5"]
    assert main([*args, "--out", str(out), "--threshold-policy", "sensitivity=0.80", "--calibrate", "platt"]) == 0
    text = capsys.readouterr().out
    assert "policy sensitivity=0.80" in text and "weights unchanged" in text
    old, new = read_bundle_meta(tiny_bundle), read_bundle_meta(out)
    assert new.thresholds != old.thresholds
    assert new.operating_point["policy"] == "sensitivity=0.80"
    assert new.calibration["method"] == "platt"
    tuning = new.training["tuning"]
    assert tuning["data"].startswith("nih-mini:val") and len(tuning["source_bundle"]["sha256"]) == 64
    assert "sensitivity=0.80" in new.threshold_method
    w_old, w_new = load_file(str(tiny_bundle)), load_file(str(out))
    assert w_old.keys() == w_new.keys()
    assert all(np.array_equal(w_old[k], w_new[k]) and w_old[k].dtype == w_new[k].dtype for k in w_old)


def test_tune_refuses_patients_shared_with_the_evaluation_split(tiny_bundle, mini_root, tmp_path):
    from chestxray.data.index import load_nih
    from chestxray.evaluation.tune import retune_bundle

    index = load_nih(mini_root, val_fraction=0.5)
    with pytest.raises(ChestXrayError, match=r"shares \d+ patients with the val split"):
        retune_bundle(tiny_bundle, index, "all", tmp_path / "x.safetensors", eval_split="val")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_evaluate_writes_calibration_reliability_and_subgroups(tiny_bundle, mini_root, tmp_path, capsys):
    from chestxray.cli import main

    out = tmp_path / "eval"
    args = ["evaluate", str(mini_root), "--model", str(tiny_bundle), "--split", "test", "--bootstrap", "50"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "macro ECE" in text and "subgroups:" in text
    m = json.loads((out / "metrics.json").read_text())
    cal = m["calibration"]
    assert cal["calibrator"] is None and "15 equal-width bins" in cal["binning"]
    assert set(cal["per_class"]) == set(m["per_class"]) and 0 <= cal["macro"]["ece"] <= 1
    sub = m["subgroups"]["columns"]
    assert set(sub) == {"sex", "age", "view"} and set(sub["age"]) <= {"<40", "40-59", ">=60"}
    assert sum(g["n_images"] for g in sub["sex"].values()) == m["n_images"]
    for groups in sub.values():
        for g in groups.values():
            for name, e in g["per_class"].items():
                whole = m["per_class"][name]["auroc"]
                if e["auroc"] is not None and whole is not None:
                    assert e["gap"] == pytest.approx(e["auroc"] - whole)
                    assert e["below"] == (e["auroc_ci"][1] is not None and e["auroc_ci"][1] < whole)
    report = (out / "report.md").read_text()
    assert "## Calibration" in report and "### By age" in report and "ECE binning" in report
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*args, "--out", str(tmp_path / "e2"), "--by", "sex"]) == 0
    assert set(json.loads((tmp_path / "e2" / "metrics.json").read_text())["subgroups"]["columns"]) == {"sex"}


def test_age_bands():
    from chestxray.evaluation.subgroups import age_band, parse_by

    assert [age_band(v) for v in ("39", "040Y", "59", "60", "085Y", "006M", "414", "x")] == [
        "<40",
        "40-59",
        "40-59",
        ">=60",
        ">=60",
        "<40",
        None,
        None,
    ]
    assert parse_by(None, ["sex", "view"]) == ["sex", "view"]
    with pytest.raises(ValueError, match="unknown subgroup 'race'"):
        parse_by("sex,race", ["sex"])
