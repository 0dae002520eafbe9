"""Scoring and re-tuning on a site's own labelled data: a CSV whose finding columns have
blanks (unknown), with or without sex/age columns, scored as a whole (`--split all`), the
threshold-transfer warning, and the torch-free path on an .onnx model."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chestxray.cli import main

DATA = Path(__file__).parent / "data"
SCORED = ["Pneumonia", "Infiltration", "Mass"]


def blanks_root(dst: Path, demographics: bool = True, copies: int = 2) -> Path:
    """csv-mini's 12 PNGs, `copies` times under new names (24 images, 24 patients), labelled one
    column per finding (1 / 0), with Pneumonia left blank (unknown) on every 4th row; no
    split column (so the reader carves one). `demographics`: also sex and age columns."""
    src = DATA / "csv-mini"
    with open(src / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    (dst / "images").mkdir(parents=True)
    with open(dst / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "patient", *(["sex", "age"] if demographics else []), *SCORED])
        for k in range(copies):
            for i, r in enumerate(rows):
                name = f"{k}_{Path(r['file']).name}"
                shutil.copy(src / r["file"], dst / "images" / name)
                on = r["findings"].split("|")
                cells = ["" if f == "Pneumonia" and i % 4 == 0 else int(f in on) for f in SCORED]
                w.writerow(
                    [f"images/{name}", f"{r['patient']}{k}", *([r["sex"], r["age"]] if demographics else []), *cells]
                )
    return dst


def expected_counts(root: Path) -> dict[str, tuple[int, int]]:
    """(positives, labelled) per scored finding, from the CSV itself."""
    with open(root / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {f: (sum(r[f] == "1" for r in rows), sum(r[f] != "" for r in rows)) for f in SCORED}


def bundle_with_thresholds(tmp_path: Path, value: float) -> Path:
    import torch

    from chestxray.labels import FINDINGS
    from chestxray.models.bundle import BundleMeta, save_bundle
    from chestxray.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", weights="none", freeze="all", image_size=64).eval()
    meta = BundleMeta(
        architecture="resnet18",
        labels=list(FINDINGS),
        preprocessing=model.preprocessing,
        thresholds=[value] * len(FINDINGS),
        name="flat-threshold-model",
        training={"data": "none (random weights, for tests)"},
    )
    return save_bundle(model, meta, tmp_path / "flat.safetensors")


def test_evaluate_on_a_csv_with_blank_labels(tmp_path, tiny_bundle, capsys):
    """Blanks are unknown, not negative: evaluate runs, and supports and prevalences (overall
    and per subgroup) count labelled images only."""
    root = blanks_root(tmp_path / "site")
    want = expected_counts(root)
    assert want["Pneumonia"][1] == 18  # 6 blanks among 24 rows
    out = tmp_path / "eval"
    rc = main(
        [
            "evaluate",
            f"csv:{root}",
            "--model",
            str(tiny_bundle),
            "--split",
            "all",
            "--bootstrap",
            "20",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 24 and m["dataset_labelled_images"] == 24
    for f, (pos, labelled) in want.items():
        e = m["per_class"][f]
        assert e["support"] == pos and e["tp"] + e["fn"] + e["fp"] + e["tn"] == labelled
        assert e["prevalence"] == pytest.approx(pos / labelled)
    by_sex = m["subgroups"]["columns"]["sex"]
    assert set(by_sex) == {"F", "M"}
    for f, (pos, labelled) in want.items():
        assert sum(g["per_class"][f]["support"] for g in by_sex.values()) == pos
        assert sum(g["per_class"][f]["labelled"] for g in by_sex.values()) == labelled
        for g in by_sex.values():
            e = g["per_class"][f]
            assert e["prevalence"] == pytest.approx(e["support"] / e["labelled"])
    assert set(m["subgroups"]["columns"]["age"]) <= {"<40", "40-59", ">=60"} and m["subgroups"]["columns"]["age"]


def test_subgroups_leave_blank_labels_out():
    """A blank (NaN) label is unknown: subgroup supports, prevalences and AUROCs use the
    labelled images only (NaN used to crash the support count)."""
    import pandas as pd

    from chestxray.evaluation.metrics import evaluate_predictions
    from chestxray.evaluation.subgroups import evaluate_subgroups

    t = np.array([[1, 0, np.nan, 1, 0, np.nan, 0, 1]], dtype=float).T
    p = np.array([[0.9, 0.2, 0.99, 0.8, 0.1, 0.01, 0.3, 0.7]]).T
    frame = pd.DataFrame({"sex": ["F", "F", "F", "F", "M", "M", "M", "M"]})
    overall = evaluate_predictions(t, p, np.array([0.5]), ["X"], n_boot=0)
    sub = evaluate_subgroups(t, p, np.arange(8), frame, ["X"], ["sex"], overall, n_boot=0)
    f, m = sub["columns"]["sex"]["F"]["per_class"]["X"], sub["columns"]["sex"]["M"]["per_class"]["X"]
    assert (f["support"], f["labelled"], m["support"], m["labelled"]) == (2, 3, 1, 3)
    assert f["prevalence"] == pytest.approx(2 / 3) and f["auroc"] == 1.0 and m["auroc"] == 1.0


@pytest.mark.slow
def test_report_and_tune_on_a_csv_with_blank_labels(tmp_path, tiny_bundle):
    """The rest of the site's path on the same data: report, tune, then evaluate the re-tuned bundle."""
    root = blanks_root(tmp_path / "site")
    want = expected_counts(root)
    assert (
        main(
            [
                "report",
                f"csv:{root}",
                "--model",
                str(tiny_bundle),
                "--split",
                "all",
                "--n",
                "3",
                "--out",
                str(tmp_path / "rep"),
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "rep" / "predictions.json").read_text())
    assert doc["split"] == "all" and len(doc["images"]) == 3
    tuned = tmp_path / "site.safetensors"
    assert main(["tune", f"csv:{root}", "--model", str(tiny_bundle), "--split", "all", "--out", str(tuned)]) == 0
    assert (
        main(
            [
                "evaluate",
                f"csv:{root}",
                "--model",
                str(tuned),
                "--split",
                "all",
                "--bootstrap",
                "0",
                "--out",
                str(tmp_path / "eval2"),
            ]
        )
        == 0
    )
    m2 = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert m2["per_class"]["Pneumonia"]["support"] == want["Pneumonia"][0]


def test_absent_subgroup_columns_give_one_line_and_no_table(tmp_path, tiny_bundle, capsys):
    root = blanks_root(tmp_path / "site", demographics=False)
    out = tmp_path / "eval"
    assert main(["evaluate", f"csv:{root}", "--model", str(tiny_bundle), "--bootstrap", "0", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "### By" not in md and "NONE" not in md and "(n=" not in md
    section = [line for line in md[md.index("## Subgroups") :].splitlines() if line.strip()]
    assert len(section) == 2 and section[1].startswith("Not evaluated by sex") and "by age" in section[1]
    said = [line for line in stdout.splitlines() if line.startswith("subgroups")]
    assert len(said) == 1 and said[0].startswith("subgroups not evaluated: sex")
    m = json.loads((out / "metrics.json").read_text())
    assert all("missing" in g for g in m["subgroups"]["columns"].values())


def test_split_all_scores_every_labelled_image_and_info_and_header_say_so(tmp_path, tiny_bundle, capsys):
    root = blanks_root(tmp_path / "site", demographics=False)
    assert main(["info", f"csv:{root}"]) == 0
    info = capsys.readouterr().out
    test_n = int(next(line for line in info.splitlines() if line.startswith("test")).split()[1])
    assert 0 < test_n < 24
    assert f"scores {test_n} of 24 labelled images (the test split); --split all scores all 24" in info
    assert (
        main(["evaluate", f"csv:{root}", "--model", str(tiny_bundle), "--bootstrap", "0", "--out", str(tmp_path / "t")])
        == 0
    )
    header = capsys.readouterr().out
    assert f"on the test split: {test_n} of 24 labelled images scored" in header
    assert (
        main(
            [
                "evaluate",
                f"csv:{root}",
                "--model",
                str(tiny_bundle),
                "--split",
                "all",
                "--bootstrap",
                "0",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert "whole dataset (every split): 24 images scored (every labelled image)" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["n_images"] == 24


def test_threshold_transfer_rule():
    from chestxray.evaluation.evaluate import threshold_transfer_warning

    def entry(tp, fp, fn, tn):
        return {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
        }

    per_class = {
        "Fits": entry(10, 5, 5, 80),  # rate 0.15, prevalence 0.15
        "TooMany": entry(10, 40, 5, 45),  # rate 0.50 > 2 x 0.15 + 0.1
        "Unspecific": entry(60, 25, 0, 5),  # rate 0.94 <= 2 x 0.67 + 0.1, but specificity 0.17 on 30 negatives
        "TooFew": entry(2, 0, 48, 50),  # rate 0.02 < (0.5 - 0.1) / 2; sensitivity 0.04 on 50 positives
        "Small": entry(1, 9, 0, 0),  # 10 images: too few for any rule
    }
    w = threshold_transfer_warning(per_class)
    assert w is not None and list(w["findings"]) == ["TooMany", "Unspecific", "TooFew"]
    assert "chestxray tune" in w["message"] and "2 x prevalence + 0.1" in w["rule"]
    assert "sensitivity 0.040" in w["findings"]["TooFew"]["why"]
    assert threshold_transfer_warning({"Fits": per_class["Fits"]}) is None


def test_evaluate_warns_when_thresholds_do_not_transfer(tmp_path, capsys):
    """Thresholds of 0: every image is called positive. Mass (6 of 24 positive) is flagged;
    Infiltration (14 of 24) and Pneumonia (18 labelled) are within the rule's limits."""
    root = blanks_root(tmp_path / "site", demographics=False)
    model = bundle_with_thresholds(tmp_path, 0.0)
    out = tmp_path / "eval"
    assert (
        main(
            ["evaluate", f"csv:{root}", "--model", str(model), "--split", "all", "--bootstrap", "0", "--out", str(out)]
        )
        == 0
    )
    err = capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["threshold_warning"]["findings"]) == ["Mass"]
    warned = [line for line in err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "Mass" in warned[0] and "chestxray tune" in warned[0]
    assert "Warning" in (out / "report.md").read_text()


def test_report_text_and_curve_grid_fit_the_scored_findings():
    from chestxray.evaluation.evaluate import curve_figure, report_markdown
    from chestxray.evaluation.metrics import evaluate_predictions

    rng = np.random.default_rng(0)
    y = (rng.random((40, 1)) < 0.3).astype(float)
    p = rng.random((40, 1))
    fig = curve_figure("roc", y, p, ["Pneumonia"], "t")
    assert len(fig.axes) == 1 and fig.get_size_inches()[0] < 8
    assert len(curve_figure("roc", np.tile(y, 14), np.tile(p, 14), [f"F{i}" for i in range(14)], "t").axes) == 15
    result = evaluate_predictions(y, p, np.array([0.5]), ["Pneumonia"], n_boot=0)
    result.update(model="m", split="test", dataset_root="r")
    md = report_markdown(result, "m", "test", "r")
    assert "14" not in md and ("one rare finding" in md or "the finding scored" in md)


def test_onnx_retune_replaces_the_graph_calibrator(tmp_path):
    """`tune` on an .onnx file keeps the graph and rewrites its metadata: the new file's
    outputs are the new calibrator applied to the network's raw probabilities."""
    pytest.importorskip("onnxruntime")
    from chestxray.data.datasets import open_dataset
    from chestxray.errors import BundleError
    from chestxray.evaluation.tune import retune_bundle
    from chestxray.inference import onnx_backend
    from chestxray.inference.calibration import Calibration, calibration_of
    from chestxray.inference.onnx_backend import OnnxBackend, read_onnx_props

    try:
        src = onnx_backend.default_onnx_path()
    except BundleError:
        pytest.skip("this install ships no default.onnx")
    root = blanks_root(tmp_path / "site", demographics=False, copies=1)
    index = open_dataset(f"csv:{root}")
    old = OnnxBackend(src)
    graph = calibration_of(old.info.meta) or Calibration.identity(old.info.meta.labels)
    x = np.random.default_rng(0).random((3, *old.input_shape), dtype=np.float32)
    p_old = np.clip(old.probabilities(x).astype(np.float64), 1e-7, 1 - 1e-7)
    raw_logit = (np.log(p_old) - np.log1p(-p_old) - graph.b) / graph.a
    for method in ("none", "platt"):
        out = tmp_path / f"{method}.onnx"
        path, summary = retune_bundle(src, index, "all", out, calibrate=method)
        new = OnnxBackend(path)
        cal = calibration_of(new.info.meta) or Calibration.identity(new.info.meta.labels)
        assert cal.method == method or cal.is_identity
        np.testing.assert_allclose(new.probabilities(x), cal.apply_logits(raw_logit), atol=2e-5)
        assert new.info.meta.thresholds == list(summary["thresholds"].values())
        assert new.info.meta.training["tuning"]["weights"].startswith("unchanged")
        props = read_onnx_props(path)
        assert props is not None and props["format_version"] == "2" and "graph_calibration" in props
    assert OnnxBackend(src).info.props.get("format_version", "1") == "1"  # the source is untouched
    # A re-tuned file is refused, not misread, by a reader of format 1 only.
    onnx_backend_version = onnx_backend.RETUNED_FORMAT_VERSION
    try:
        onnx_backend.RETUNED_FORMAT_VERSION = 1
        with pytest.raises(BundleError, match="newer than this package reads"):
            OnnxBackend(tmp_path / "none.onnx")
    finally:
        onnx_backend.RETUNED_FORMAT_VERSION = onnx_backend_version
    with pytest.raises(Exception, match="input check"):
        retune_bundle(src, index, "all", tmp_path / "x.onnx", input_check_split="all")


# The torch-free install, simulated as tests/test_onnx.py does: an import hook makes torch and
# the packages only its extra brings unimportable (ModuleNotFoundError, as when not installed).
BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "safetensors", "onnx", "onnxscript", "timm", "yaml"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from chestxray.cli import main
"""


def _no_torch(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "notorch.py"
    script.write_text(BLOCK + body)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_torch_commands_name_the_extra_without_torch(tmp_path, mini_root):
    commands = [
        ["train", str(mini_root), "--out", str(tmp_path / "run")],
        ["models"],
        ["ensemble", str(mini_root), "--models", "a.safetensors", "b.safetensors", "--out", "e.safetensors"],
    ]
    body = f"import json\nfor argv in {json.dumps(commands)}:\n    print(json.dumps(main(argv)))\n"
    proc = _no_torch(tmp_path, body)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.split() == ["2", "2", "2"]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("chestxray ")]
    assert [line.split(":")[0] for line in lines] == ["chestxray train", "chestxray models", "chestxray ensemble"]
    assert all("pip install 'chestxray[torch]'" in line for line in lines)


@pytest.mark.slow
def test_evaluate_tune_report_on_onnx_without_torch(tmp_path):
    """A site scores the packaged ONNX model, re-tunes it and scores the result, and draws
    the example report, with torch unimportable."""
    pytest.importorskip("onnxruntime")
    from chestxray.errors import BundleError
    from chestxray.inference.onnx_backend import default_onnx_path

    try:
        onnx = default_onnx_path()
    except BundleError:
        pytest.skip("this install ships no default.onnx")
    root = blanks_root(tmp_path / "site")
    site, tuned = f"csv:{root}", str(tmp_path / "site.onnx")
    runs = [
        ["evaluate", site, "--model", str(onnx), "--split", "all", "--bootstrap", "10", "--out", "e1"],
        ["tune", site, "--model", str(onnx), "--split", "all", "--out", tuned],
        ["evaluate", site, "--model", tuned, "--split", "all", "--bootstrap", "0", "--out", "e2"],
        ["report", site, "--model", tuned, "--split", "all", "--n", "2", "--out", "rep"],
        ["evaluate", site, "--model", tuned, "--backend", "onnx", "--bootstrap", "0", "--out", "e3"],
    ]
    body = (
        f"import json, pathlib, sys\nrcs = [main(argv) for argv in {json.dumps(runs)}]\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors'))\n"
        "pathlib.Path('result.json').write_text(json.dumps([rcs, loaded]))\n"
    )
    proc = _no_torch(tmp_path, body)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text()) == [[0] * len(runs), []], proc.stderr[-3000:]
    m1 = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert m1["n_images"] == m2["n_images"] == 24
    for f in SCORED:  # re-tuning changes calibration and thresholds, never the ranking
        assert m2["per_class"][f]["auroc"] == pytest.approx(m1["per_class"][f]["auroc"], abs=1e-6)
    assert "no Grad-CAM" in (tmp_path / "rep" / "index.html").read_text()


def test_tune_says_what_it_is_doing(tmp_path, tiny_bundle, capsys, caplog, monkeypatch):
    """Without a terminal: progress lines while the images are read, then one line per phase."""
    import logging

    from chestxray.evaluation import evaluate

    monkeypatch.setattr(evaluate, "PROGRESS_EVERY_S", 1e-9)  # a line per chunk instead of every 10 s
    root = blanks_root(tmp_path / "site", demographics=False)
    with caplog.at_level(logging.INFO, logger="chestxray"):
        assert (
            main(
                [
                    "tune",
                    f"csv:{root}",
                    "--model",
                    str(tiny_bundle),
                    "--split",
                    "all",
                    "--out",
                    str(tmp_path / "t.safetensors"),
                ]
            )
            == 0
        )
    err = capsys.readouterr().err
    assert "all split: 24/24 images" in err
    said = [r.getMessage() for r in caplog.records if r.name.startswith("chestxray.evaluation")]
    assert any(m.startswith("fitting the temperature calibrator and the f1 thresholds on site:all") for m in said)
    assert any(m.startswith("writing ") and m.endswith("t.safetensors") for m in said)


def test_calibration_metrics_leave_blank_labels_out(tmp_path):
    from chestxray.evaluation.calibration import calibration_metrics, write_reliability

    t = np.array([[1, 0, np.nan, 1, np.nan], [np.nan] * 5]).T
    p = np.array([[0.9, 0.2, 0.99, 0.6, 0.01], [0.5] * 5]).T
    got = calibration_metrics(t, p, ["A", "B"])
    want = calibration_metrics(t[[0, 1, 3], :1], p[[0, 1, 3], :1], ["A"])["per_class"]["A"]
    assert got["per_class"]["A"] == pytest.approx(want)
    assert got["per_class"]["B"] == {"brier": None, "ece": None}
    assert got["macro"]["brier"] == pytest.approx(want["brier"])
    assert write_reliability(t, p, ["A", "B"], tmp_path, "t").stat().st_size > 1000
