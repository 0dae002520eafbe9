"""The orientation check: a template of the training radiographs' layout warns
turned and inverted radiographs, spares upright ones, travels in the bundle's JSON, and
old bundles without it work as before."""

import json

import numpy as np
import pytest

from chestxray.data.images import read_image
from chestxray.data.transforms import EvalPreset, Preprocessing
from chestxray.inference.orientation import (
    OrientationCheck,
    fit_orientation,
    orientation_of,
    orientation_warning,
    thumbnails,
)


@pytest.fixture(scope="module")
def mini_inputs(mini_root):
    """nih-mini's model inputs at 64 px: (train_val part, official test part)."""
    pre = EvalPreset(Preprocessing(size=64))

    def load(list_name: str) -> np.ndarray:
        names = (mini_root / list_name).read_text().split()
        return np.stack([pre(read_image(mini_root / "images" / n)) for n in names])

    return load("train_val_list.txt"), load("test_list.txt")


def test_thumbnails_are_standardised_and_backend_independent():
    import torch

    x = np.random.default_rng(0).random((3, 1, 64, 64)).astype(np.float32)
    t = thumbnails(x)
    assert t.shape == (3, 32 * 32)
    np.testing.assert_allclose(t.mean(axis=1), 0, atol=1e-9)
    np.testing.assert_allclose(t.std(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(thumbnails(torch.from_numpy(x)), t, atol=1e-5)  # the bulk pipeline's tensors
    np.testing.assert_allclose(thumbnails(3 * x + 0.2), t, atol=1e-6)  # brightness and contrast do not matter
    odd = np.random.default_rng(1).random((2, 1, 70, 70))  # not a multiple of 32: area bins
    assert thumbnails(odd).shape == (2, 1024)


def test_turned_and_inverted_radiographs_are_warned_upright_ones_not(mini_inputs):
    train, test = mini_inputs
    check = fit_orientation(train, info={"fitted_on": "nih-mini:train_val"})
    assert check.template.shape == (32, 32) and check.info["train_images"] == len(train)
    assert check.assess(test)[0].tolist() == [0] * len(test)  # real held-out radiographs
    for k in (1, 2, 3):
        code = check.assess(np.rot90(test, k, axes=(2, 3)))[0]
        assert np.mean(code == k) >= 0.9, (k, code)
    inverted = check.assess(1.0 - test)[0]
    assert np.mean(inverted == 4) >= 0.9
    text = orientation_warning(1, 0.8, 0.1)
    assert "turned 90 degrees counter-clockwise" in text and "0.80" in text and "0.10" in text
    assert "upside down" in orientation_warning(2, 0.8, 0.1) and "inverted" in orientation_warning(4, 0.8, -0.8)
    assert orientation_warning(0, 0.8, 0.8) is None


def test_round_trip_through_the_bundle_json(mini_inputs, tiny_bundle, sample_images):
    from chestxray.errors import BundleError
    from chestxray.inference.predict import Analyzer
    from chestxray.models.bundle import BundleMeta, read_bundle_meta

    train, test = mini_inputs
    check = fit_orientation(train[:40], train[40:])
    assert check.info["val_images"] == len(train) - 40
    meta = read_bundle_meta(tiny_bundle)
    assert meta.orientation is None and orientation_of(meta) is None  # bundles made before the check
    meta.orientation = check.to_dict()
    again = BundleMeta.from_json(meta.to_json(), "x")
    back = orientation_of(again)
    np.testing.assert_allclose(back.template, check.template, atol=1e-4)
    assert back.margin == check.margin
    np.testing.assert_array_equal(back.assess(test)[0], check.assess(test)[0])
    bad = dict(meta.orientation, template=[0.0] * 10)
    with pytest.raises(BundleError, match="orientation check is incomplete"):
        OrientationCheck.from_dict(bad, "b.safetensors")
    json.dumps(meta.orientation)  # JSON-able as stored

    # An old bundle: run() gives the same as before (no checks), and no warnings.
    old = Analyzer.load(tiny_bundle)
    assert old.orientation is None
    probs, checks = old.run(np.stack([old.preprocess(np.rot90(read_image(p)))[1] for p in sample_images[:2]]))
    assert checks is None and probs.shape == (2, 14)
