"""Ensembles of bundles: averaged probabilities, re-tuned thresholds, usable everywhere."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from chestxray.cli import main
from chestxray.errors import BundleError, ChestXrayError
from chestxray.inference.predict import Analyzer
from chestxray.labels import FINDINGS
from chestxray.models.bundle import BundleMeta, load_bundle, read_bundle_meta, save_bundle
from chestxray.models.registry import create_model


def _member(tmp_path, name, seed, arch="resnet18", size=32):
    torch.manual_seed(seed)
    model = create_model(arch, weights="none", freeze="all", image_size=size).eval()
    meta = BundleMeta(
        arch,
        list(FINDINGS),
        model.preprocessing,
        [0.5] * 14,
        name=name,
        training={"split": {"validation": {"fraction": 0.3, "seed": 0, "by": "patient"}}},
    )
    return save_bundle(model, meta, tmp_path / f"{name}.safetensors")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    d = tmp_path_factory.mktemp("members")
    return [_member(d, "a", 0), _member(d, "b", 1, arch="timm/resnet10t" if _has_timm() else "resnet18")]


def _has_timm():
    return importlib.util.find_spec("timm") is not None


@pytest.mark.slow
def test_ensemble_is_the_mean_of_member_probabilities(tmp_path, members, mini_root, original_png, capsys):
    out = tmp_path / "ens.safetensors"
    rc = main(["ensemble", str(mini_root), "--models", *map(str, members), "--out", str(out), "--val-fraction", "0.3"])
    assert rc == 0 and "ensemble" in capsys.readouterr().out
    meta = read_bundle_meta(out)
    assert meta.architecture == "ensemble" and len(meta.training["members"]) == 2
    assert "validation" in meta.metrics and all(0 <= t <= 1 for t in meta.thresholds)
    ens = Analyzer.load(out).predict(original_png)
    parts = [Analyzer.load(m).predict(original_png) for m in members]
    for f in ens.findings:
        expected = np.mean([p.probability(f.finding) for p in parts])
        assert f.probability == pytest.approx(expected, abs=1e-5)
    # The ensemble bundle works where any bundle does: evaluate and ONNX export.
    assert (
        main(["evaluate", "--model", str(out), str(mini_root), "--bootstrap", "0", "--out", str(tmp_path / "ev")]) == 0
    )
    assert set(json.loads((tmp_path / "ev" / "metrics.json").read_text())["per_class"]) == set(FINDINGS)
    assert main(["export", "--model", str(out), "--onnx", str(tmp_path / "ens.onnx")]) == 0
    onnx = Analyzer.load(tmp_path / "ens.onnx", backend="onnx").predict(original_png)
    assert max(abs(onnx.probability(f.finding) - f.probability) for f in ens.findings) < 1e-4


@pytest.mark.slow
def test_ensemble_refuses_mismatched_members_and_cam(tmp_path, members, mini_root, original_png, capsys):
    from chestxray.inference.explain import explain
    from chestxray.training.ensemble import make_ensemble

    other = _member(tmp_path, "big", 2, size=48)
    with pytest.raises(BundleError, match="input size"):
        make_ensemble([members[0], other], mini_root, tmp_path / "x.safetensors")
    assert (
        main(
            [
                "ensemble",
                str(mini_root),
                "--models",
                str(members[0]),
                str(other),
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 2
    )
    assert "input size" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ChestXrayError, match="at least two"):
        make_ensemble([members[0]], mini_root, tmp_path / "y.safetensors")
    out = make_ensemble(members, mini_root, tmp_path / "ens.safetensors", val_fraction=0.3)
    with pytest.raises(ChestXrayError, match="not defined for an ensemble"):
        explain(Analyzer.load(out), original_png, findings=["Effusion"])
    model, _ = load_bundle(out)
    assert len(model.members) == 2


@pytest.mark.slow
def test_ensemble_tunes_on_another_dataset(tmp_path, members, capsys):
    """Any dataset the data layer reads (here the CheXpert-layout fixture, whose unknown
    labels are NaN and left out of each finding's search) can tune the thresholds."""
    from pathlib import Path

    root = Path(__file__).parent / "data" / "chexpert-mini"
    out = tmp_path / "ens.safetensors"
    rc = main(
        [
            "ensemble",
            f"chexpert:{root}",
            "--models",
            *map(str, members),
            "--out",
            str(out),
            "--val-fraction",
            "0.3",
            "--views",
            "all",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    meta = read_bundle_meta(out)
    tuned = meta.training["thresholds_tuned_on"]
    assert tuned["dataset"] == "chexpert" and tuned["fraction"] == 0.3
    assert "chexpert:" in meta.threshold_method and len(meta.thresholds) == 14
    assert (
        main(["ensemble", "nosuch:/x", "--models", *map(str, members), "--out", str(tmp_path / "e2.safetensors")]) == 2
    )
    assert "unknown dataset 'nosuch'" in capsys.readouterr().err
