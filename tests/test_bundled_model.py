"""The model shipped in the package: it loads, it is what the docs say, and the docs'
numbers are what it produces (README example here; MODEL_CARD with the opt-in sample)."""

import json
import os
import re
from pathlib import Path

import pytest

from chestxray.cli import main
from chestxray.inference.predict import Analyzer, default_bundle_path
from chestxray.labels import FINDINGS

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ROOT = os.environ.get("CHESTXRAY_SAMPLE_ROOT")


@pytest.fixture(scope="module")
def analyzer():
    return Analyzer.load()


def test_bundled_model_is_self_describing(analyzer):
    from safetensors import safe_open

    assert analyzer.name == "chestxray-resnet50-nihsample-128"
    assert analyzer.labels == list(FINDINGS)
    assert analyzer.preprocessing.size == 128
    assert all(0.0 < t < 1.0 for t in analyzer.thresholds)
    meta = analyzer.meta
    assert meta.architecture == "resnet50"
    assert meta.training["images"] == {"train": 999, "val": 166}
    assert "not for clinical use" in meta.notes.lower()
    with safe_open(str(default_bundle_path()), framework="numpy") as f:
        assert f.get_tensor("backbone.fc.weight").dtype.name == "float16"  # shipped at half size


def test_readme_example_output_is_what_the_model_prints(capsys):
    """The table in README.md's quick start must be the bundled model's real output."""
    readme = (REPO / "README.md").read_text()
    # The command as the README shows it (`make run`'s: maybe with --backend onnx), run as shown.
    command = re.search(r"^\$ chestxray predict (.*examples/00013125_000\.png.*)--cam out/cam$", readme, flags=re.M)
    assert command is not None
    block = readme[command.end() :].split("```", 1)[0]
    rows = re.findall(r"^\s+(\w+)\s+([\d.]+)\s+([\d.]+)\s+(YES|-)$", block, flags=re.M)
    assert len(rows) == 14
    argv = [str(REPO / a) if a.startswith("examples/") else a for a in command.group(1).split()]
    assert main(["predict", *argv, "--format", "json"]) == 0
    pred = json.loads(capsys.readouterr().out)[0]
    got = [
        (f["finding"], f"{f['probability']:.3f}", f"{f['threshold']:.3f}", "YES" if f["positive"] else "-")
        for f in pred["findings"]
    ]
    assert got == rows


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE_ROOT, reason="set CHESTXRAY_SAMPLE_ROOT to the 1,350-image NIH sample")
def test_model_card_numbers_are_reproduced(tmp_path, capsys):
    """MODEL_CARD.md's held-out figures come from `chestxray evaluate ROOT --split test`."""
    assert main(["evaluate", str(SAMPLE_ROOT), "--split", "test", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    card = (REPO / "MODEL_CARD.md").read_text()
    m = re.search(r"Macro AUROC \*\*([\d.]+) \(95% CI ([\d.]+)-([\d.]+)\)\*\*", card)
    assert m, "MODEL_CARD.md lost its macro AUROC line"
    macro = metrics["macro"]
    assert f"{macro['auroc']:.3f}" == m.group(1)
    assert [f"{v:.3f}" for v in macro["auroc_ci"]] == [m.group(2), m.group(3)]
    for name, entry in metrics["per_class"].items():
        row = re.search(rf"^\| {name} \| (\d+) / 185 \| ([\d.]+) \(([\d.]+)-([\d.]+)\)", card, flags=re.M)
        assert row, name
        assert int(row.group(1)) == entry["support"]
        assert row.group(2) == f"{entry['auroc']:.3f}"
        assert [row.group(3), row.group(4)] == [f"{v:.3f}" for v in entry["auroc_ci"]]
