"""External validation: `evaluate` / `report` on other layouts score the findings a model
shares with the dataset. The NIH test split laid out as a CSV folder (same PNGs) and as a
CheXpert folder (JPEG) must give the NIH layout's per-finding AUROC."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from chestxray.cli import main
from chestxray.labels import FINDINGS

DATA = Path(__file__).parent / "data"
METADATA = os.environ.get("CHESTXRAY_METADATA_ROOT")


def evaluate(root: str, split: str, out: Path, *extra: str) -> dict:
    assert main(["evaluate", root, "--split", split, "--bootstrap", "0", "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def nih_result(tmp_path_factory, mini_root) -> dict:
    return evaluate(str(mini_root), "test", tmp_path_factory.mktemp("nih"))


def csv_copy(mini_root: Path, dst: Path) -> Path:
    """The NIH test split as a plain CSV folder: labels.csv (one column per finding) + PNGs."""
    test = set((mini_root / "test_list.txt").read_text().split())
    (dst / "pngs").mkdir(parents=True)
    with open(mini_root / "Data_Entry_2017.csv", newline="") as fh, open(dst / "labels.csv", "w", newline="") as out:
        w = csv.writer(out)
        w.writerow(["path", "patient", "view", "split", *FINDINGS])
        for r in csv.DictReader(fh):
            if r["Image Index"] not in test:
                continue
            shutil.copy(mini_root / "images" / r["Image Index"], dst / "pngs" / r["Image Index"])
            on = r["Finding Labels"].split("|")
            w.writerow(
                [
                    f"pngs/{r['Image Index']}",
                    r["Patient ID"],
                    r["View Position"],
                    "test",
                    *[int(f in on) for f in FINDINGS],
                ]
            )
    return dst


@pytest.mark.slow
def test_csv_png_copy_gives_the_same_auroc(tmp_path, mini_root, nih_result):
    root = csv_copy(mini_root, tmp_path / "mycsv")
    got = evaluate(f"csv:{root}", "test", tmp_path / "eval")
    assert got["n_images"] == nih_result["n_images"] == 30
    assert got["n_patients"] == nih_result["n_patients"]
    for name in FINDINGS:
        assert got["per_class"][name]["auroc"] == nih_result["per_class"][name]["auroc"], name
        assert got["per_class"][name]["support"] == nih_result["per_class"][name]["support"], name


@pytest.mark.slow
def test_chexpert_jpeg_copy_within_jpeg_noise(tmp_path, nih_result, capsys):
    got = evaluate(f"chexpert:{DATA / 'chexpert-mini'}", "val", tmp_path / "eval")
    printed = capsys.readouterr().out
    assert "Effusion               <- Pleural Effusion" in printed
    assert "not scored, not labelled by the dataset: Infiltration, Mass, Nodule" in printed
    shared = ["Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax", "Consolidation", "Edema"]
    assert list(got["per_class"]) == shared
    assert got["label_mapping"]["scored"]["Effusion"] == "Pleural Effusion"
    assert "Lung Lesion" in got["label_mapping"]["not_scored_dataset_only"]
    for name in shared:
        a, b = got["per_class"][name], nih_result["per_class"][name]
        assert a["support"] == b["support"], name
        if b["auroc"] is None:
            assert a["auroc"] is None, name
        else:  # the same images after JPEG compression (quality 95): scores move a little
            assert abs(a["auroc"] - b["auroc"]) <= 0.03, (name, a["auroc"], b["auroc"])
    assert (tmp_path / "eval" / "roc_curves.png").stat().st_size > 0
    assert "## Label mapping" in (tmp_path / "eval" / "report.md").read_text()


def test_report_on_chexpert_fixture_uses_model_vocabulary(tmp_path, tiny_bundle):
    args = [
        "report",
        f"chexpert:{DATA / 'chexpert-mini'}",
        "--model",
        str(tiny_bundle),
        "--split",
        "val",
        "--n",
        "3",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    items = json.loads((tmp_path / "predictions.json").read_text())["images"]
    assert len(items) == 3
    truths = {t for item in items for t in item["true"]}
    assert "Pleural Effusion" not in truths and truths <= set(FINDINGS) | {"Enlarged Cardiomediastinum"}


def yn(flag: bool) -> str:
    return "YES" if flag else "NO"


def google_file(mini_root: Path, path: Path) -> Path:
    """A Google-2019-style label file for nih-mini's test images (labels from NIH's own)."""
    with open(mini_root / "Data_Entry_2017.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    test = set((mini_root / "test_list.txt").read_text().split())
    with open(path, "w", newline="") as out:
        w = csv.writer(out)
        w.writerow(
            ["Image Index", "Patient ID", "Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass", "Set Id"]
        )
        for r in rows:
            on = r["Finding Labels"].split("|")
            w.writerow(
                [
                    r["Image Index"],
                    r["Patient ID"],
                    "NO",
                    yn("Pneumothorax" in on),
                    yn(bool({"Consolidation", "Pneumonia"} & set(on))),
                    yn(bool({"Nodule", "Mass"} & set(on))),
                    "test" if r["Image Index"] in test else "val",
                ]
            )
    return path


@pytest.mark.slow
def test_google2019_labels_on_nih(tmp_path, mini_root, tiny_bundle, capsys):
    from chestxray.evaluation.metrics import per_class_auroc
    from chestxray.inference.predict import Analyzer

    labels = google_file(mini_root, tmp_path / "google.csv")
    got = evaluate(
        str(mini_root), "test", tmp_path / "eval", "--model", str(tiny_bundle), "--labels", f"google2019:{labels}"
    )
    printed = capsys.readouterr().out
    assert "Nodule or mass" in printed and "model: max of Nodule, Mass" in printed
    assert list(got["per_class"]) == ["Pneumothorax", "Nodule or mass", "Airspace opacity"]
    assert got["label_mapping"]["not_scored_dataset_only"] == ["Fracture"]
    # Nodule or mass is scored as max(P(Nodule), P(Mass)).
    test = sorted((mini_root / "test_list.txt").read_text().split())
    analyzer = Analyzer.load(tiny_bundle)
    preds = analyzer.predict([mini_root / "images" / n for n in test])
    score = np.array([[max(p.probability("Nodule"), p.probability("Mass"))] for p in preds])
    with open(labels, newline="") as fh:
        truth = {r["Image Index"]: float(r["Nodule or mass"] == "YES") for r in csv.DictReader(fh)}
    want = per_class_auroc(np.array([[truth[n]] for n in test]), score)[0]
    assert got["per_class"]["Nodule or mass"]["auroc"] == pytest.approx(want)
    assert main(["evaluate", str(mini_root), "--labels", "google:x"]) == 2


@pytest.mark.skipif(not METADATA, reason="set CHESTXRAY_METADATA_ROOT to ../shared/metadata (real label files)")
def test_real_google2019_file_parses(mini_root):
    from chestxray.data.datasets import open_dataset
    from chestxray.data.datasets.google2019 import with_google_labels

    path = Path(METADATA) / "nih-google2019" / "google2019_nih-chest-xray-labels.csv.gz"
    index = with_google_labels(open_dataset(str(mini_root)), path)
    assert index.n_label_rows == 4_376
    assert set(index.frame["split"]) <= {"test", "val"} and not np.isnan(index.labels).any()
