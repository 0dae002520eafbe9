import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from chestxray.evaluation.metrics import bootstrap_ci, evaluate_predictions, weighted_auroc_auprc


def test_weighted_auroc_auprc_match_sklearn():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.2).astype(float)
    p = np.round(rng.random(300), 2)  # many ties
    w = rng.integers(0, 3, (7, 300)).astype(float)
    auroc, auprc = weighted_auroc_auprc(y, p, w)
    for k in range(7):
        assert auroc[k] == pytest.approx(roc_auc_score(y, p, sample_weight=w[k]), abs=1e-12)
        assert auprc[k] == pytest.approx(average_precision_score(y, p, sample_weight=w[k]), abs=1e-12)


def test_undefined_when_no_positive():
    y = np.zeros(5)
    auroc, auprc = weighted_auroc_auprc(y, np.linspace(0, 1, 5), np.ones((1, 5)))
    assert np.isnan(auroc[0]) and np.isnan(auprc[0])


def _data(n_patients=60, per=2, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), per)
    targets = (rng.random((len(groups), 3)) < 0.3).astype(float)
    targets[:, 2] = 0  # a finding with no positive
    probs = np.clip(0.35 * targets + rng.random(targets.shape) * 0.7, 0, 1)
    return targets, probs, groups


def test_evaluate_reports_undefined_and_accuracy_baseline():
    targets, probs, groups = _data()
    res = evaluate_predictions(targets, probs, np.full(3, 0.5), ["A", "B", "C"], groups=groups, n_boot=200)
    assert res["per_class"]["C"]["auroc"] is None
    assert res["per_class"]["C"]["auroc_ci"] == [None, None]
    assert res["defined_auroc_classes"] == 2
    assert res["per_class"]["A"]["auroc"] == pytest.approx(roc_auc_score(targets[:, 0], probs[:, 0]))
    lo, hi = res["per_class"]["A"]["auroc_ci"]
    assert lo < res["per_class"]["A"]["auroc"] < hi
    assert res["all_negative_accuracy"] == pytest.approx(1 - targets.mean())
    assert res["n_patients"] == 60
    assert res["macro"]["auroc"] == pytest.approx(np.mean([res["per_class"][k]["auroc"] for k in "AB"]))
    a = res["per_class"]["A"]
    assert a["tp"] + a["fn"] == a["support"]


def test_bootstrap_resamples_patients_not_images():
    # Each patient has 10 identical copies: image-level resampling would shrink the CI by
    # ~sqrt(10); patient-level must give the same CI as one image per patient.
    targets, probs, groups = _data(n_patients=80, per=1, seed=3)
    rep = 10
    ci_one = bootstrap_ci(targets, probs, groups, n_boot=300, seed=0)["auroc"][:, 0]
    ci_rep = bootstrap_ci(
        np.repeat(targets, rep, 0), np.repeat(probs, rep, 0), np.repeat(groups, rep), n_boot=300, seed=0
    )["auroc"][:, 0]
    assert ci_rep == pytest.approx(ci_one, abs=1e-9)
    assert ci_one[1] - ci_one[0] > 0.05


def test_curve_panels_name_their_score_and_label_the_chance_line():
    from chestxray.evaluation.evaluate import curve_figure
    from chestxray.evaluation.metrics import evaluate_predictions

    rng = np.random.default_rng(0)
    labels = ["A", "B", "C"]
    targets = (rng.random((60, 3)) < [0.3, 0.5, 0.0]).astype(float)  # C has no positives
    probs = np.clip(targets * 0.4 + rng.random((60, 3)) * 0.6, 0, 1)
    per_class = evaluate_predictions(targets, probs, np.full(3, 0.5), labels, n_boot=0)["per_class"]
    for kind, metric in (("roc", "auroc"), ("pr", "auprc")):
        axes = curve_figure(kind, targets, probs, labels, "t", per_class).axes
        for ax, name in zip(axes, labels):
            score = per_class[name][metric]
            title = ax.get_title()
            assert title.startswith(name) and metric.upper() in title
            assert (f"{score:.3f}" if score is not None else "undefined") in title
        legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
        assert legend[0] == "model" and legend[1].startswith("chance")
        if kind == "pr":
            assert f"prevalence {targets[:, 0].mean():.3f}" in legend[1]
        assert axes[2].get_legend() is None  # no positives: an "undefined" panel, no curve
