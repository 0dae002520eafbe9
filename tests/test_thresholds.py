import logging

import numpy as np
import pytest

from chestxray.evaluation.thresholds import FALLBACK_THRESHOLD, best_f1_threshold, tune_thresholds


def f1_at(scores, targets, t):
    pred = scores >= t
    tp = np.sum(pred & (targets > 0.5))
    fp = np.sum(pred & (targets < 0.5))
    fn = np.sum(~pred & (targets > 0.5))
    return 2 * tp / (2 * tp + fp + fn)


def test_constructed_case_has_known_optimum():
    # Positives at 0.9, 0.8, 0.4; negatives at 0.7, 0.3, 0.2. Cut below 0.8: F1 0.8 (TP 2, FN 1);
    # below 0.4: F1 6/7 (TP 3, FP 1); below 0.3: F1 0.75. Optimum strictly between 0.3 and 0.4.
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.2])
    targets = np.array([1, 1, 0, 1, 0, 0])
    t, f1 = best_f1_threshold(scores, targets)
    assert 0.3 < t <= 0.4
    assert f1 == pytest.approx(6 / 7)
    assert f1_at(scores, targets, t) == pytest.approx(6 / 7)


def test_exact_search_beats_or_matches_any_grid():
    rng = np.random.default_rng(1)
    for _ in range(20):
        targets = (rng.random(300) < 0.15).astype(int)
        if targets.sum() == 0:
            continue
        scores = np.clip(rng.normal(0.3 + 0.3 * targets, 0.2), 0, 1).round(3)
        t, f1 = best_f1_threshold(scores, targets)
        assert 0.0 <= t <= 1.0
        assert f1_at(scores, targets, t) == pytest.approx(f1)
        grid_best = max(f1_at(scores, targets, g) for g in np.linspace(0, 1, 1001))
        assert f1 >= grid_best - 1e-12


def test_ties_are_kept_together():
    scores = np.array([0.5, 0.5, 0.5, 0.1])
    targets = np.array([1, 0, 0, 0])
    t, f1 = best_f1_threshold(scores, targets)
    # Either all three 0.5s are positive or none; the only useful cut is below them.
    assert f1_at(scores, targets, t) == pytest.approx(f1) == pytest.approx(0.5)


def test_class_without_positive_gets_fallback_and_warning(caplog):
    probs = np.array([[0.9, 0.2], [0.1, 0.3], [0.8, 0.4]])
    targets = np.array([[1, 0], [0, 0], [1, 0]])
    with caplog.at_level(logging.WARNING):
        res = tune_thresholds(probs, targets, ["A", "B"])
    assert res.fallback == ["B"]
    assert res.thresholds[1] == FALLBACK_THRESHOLD
    assert np.isnan(res.f1[1])
    assert 0.1 < res.thresholds[0] <= 0.8
    assert "B" in caplog.text


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        tune_thresholds(np.zeros((3, 2)), np.zeros((3, 3)), ["A", "B"])
