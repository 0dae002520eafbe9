"""`chestxray report`: grid.png, index.html and predictions.json of seeded examples."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from cam_helpers import make_root
from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.cli import main
from chestxray.data.index import load_nih
from chestxray.errors import DatasetError
from chestxray.evaluation.report import choose_examples, write_report
from chestxray.inference.predict import Analyzer

# One torch thread per test module (see conftest.single_torch_thread).
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_choice_is_seeded_and_within_the_split(mini_root):
    index = load_nih(mini_root)
    test = set(index.split_positions("test").tolist())
    a, b, c = (choose_examples(index, "test", 5, s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(a.tolist()) <= test and len(set(a.tolist())) == 5
    assert len(choose_examples(index, "test", 1000, 0)) == len(test)  # clamped to the split
    with pytest.raises(DatasetError, match="at least 1"):
        choose_examples(index, "test", 0, 0)


def test_report_files(tiny_bundle, mini_root, tmp_path):
    analyzer = Analyzer.load(tiny_bundle)
    index = load_nih(mini_root)
    summary = write_report(analyzer, index, tmp_path / "rep", split="test", n=3, seed=0)
    assert summary["images"] == 3 and summary["unreadable"] == 0
    chosen = [str(index.frame["image"].iloc[p]) for p in choose_examples(index, "test", 3, 0)]

    doc = json.loads((tmp_path / "rep" / "predictions.json").read_text())
    assert doc["model"] == "tiny-test-model" and doc["note"] == NOT_FOR_CLINICAL_USE
    assert [d["image"] for d in doc["images"]] == chosen
    for d in doc["images"]:
        row = index.frame.index[index.frame["image"] == d["image"]][0]
        text = index.frame["labels_text"].iloc[row]
        assert d["true"] == ([] if text == "No Finding" else [t for t in index.pathologies if t in text.split("|")])
        probs = {f["finding"]: f["probability"] for f in d["prediction"]["findings"]}
        assert d["cam_finding"] == max(probs, key=probs.get)  # the top finding's Grad-CAM
        assert d["predicted"] == [f["finding"] for f in d["prediction"]["findings"] if f["positive"]]
        assert d["missed"] == [t for t in d["true"] if t not in d["predicted"]]

    with Image.open(tmp_path / "rep" / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width > 800 and grid.height > 300

    page = (tmp_path / "rep" / "index.html").read_text()
    assert "tiny-test-model" in page and NOT_FOR_CLINICAL_USE in page
    assert 'src="grid.png"' in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 6  # radiograph + CAM per image
    assert all(name in page for name in chosen)
    assert "http://" not in page and "https://" not in page  # self-contained


def test_cli_and_an_unreadable_image(capsys, tiny_bundle, mini_root, tmp_path):
    images = sorted((mini_root / "images").glob("*.png"))[:2]
    root = make_root(
        tmp_path / "root",
        {p.name: p for p in images} | {"broken.png": images[0]},
        {images[0].name: "Cardiomegaly", images[1].name: "No Finding", "broken.png": "Mass"},
        test=[images[0].name, images[1].name, "broken.png"],
    )
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = main(["report", str(root), "--model", str(tiny_bundle), "--n", "5", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 1 and "1 of 3 images could not be read" in err
    assert "tiny-test-model" in out and NOT_FOR_CLINICAL_USE in out
    doc = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(doc["images"]) == 3
    broken = next(d for d in doc["images"] if d["image"] == "broken.png")
    assert broken["prediction"]["error"] and broken["cam_finding"] is None
    assert "unreadable" in (tmp_path / "out" / "index.html").read_text()
    code = main(["report", str(root), "--model", str(tiny_bundle), "--split", "val", "--out", str(tmp_path / "o2")])
    assert code == 2 and "no images" in capsys.readouterr().err


def _item(truth, called, error=None):
    from chestxray.evaluation.report import ReportItem
    from chestxray.inference.explain import CamResult
    from chestxray.inference.predict import Finding, Prediction

    findings = [Finding(name, p, 0.5, p >= 0.5) for name, p in called]
    pred = Prediction("x.png", "m", findings, error)
    cam = None if error else CamResult(called[0][0], called[0][1], np.ones((8, 8), np.float32))
    thumb = np.full((64, 64), 128, np.uint8)
    return ReportItem("x.png", truth, pred, cam, thumb, None if error else np.zeros((64, 64, 3), np.uint8))


def test_grid_captions_are_coloured_and_sit_under_their_own_images():
    from matplotlib.offsetbox import AnchoredOffsetbox

    from chestxray.evaluation.report import caption_runs, grid_figure

    item = _item(["Mass", "Effusion"], [("Mass", 0.9), ("Nodule", 0.7), ("Hernia", 0.1)])
    runs = [run for line in caption_runs(item) for run in line]
    assert ("Mass 0.90", "tp") in runs and ("Nodule 0.70", "fp") in runs and ("Effusion", "fn") in runs
    assert not any(text.startswith("Hernia") for text, _ in runs)  # below threshold: not called

    fig = grid_figure([item] * 6, "m", "six tiles")  # 4 + 2: two rows
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    placed = [(ax, a) for ax in fig.axes for a in ax.artists if isinstance(a, AnchoredOffsetbox)]
    assert len(placed) == 6
    image_tops = sorted({round(ax.get_window_extent(renderer).y1) for ax, _ in placed}, reverse=True)
    assert len(image_tops) == 2
    for ax, box in placed:
        img, cap = ax.get_window_extent(renderer), box.get_window_extent(renderer)
        gap = img.y0 - cap.y1  # display y grows upwards
        assert 0 <= gap < 10, "the caption starts right under its radiograph"
        below = [top for top in image_tops if top < img.y0]
        if below:  # a row below: the caption ends above that row's images
            assert cap.y0 > below[0]
