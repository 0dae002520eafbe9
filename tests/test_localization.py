"""Localization scoring: box file parsing, the pure scores on hand-made maps and boxes,
and the whole protocol on a constructed dataset with a known answer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cam_helpers import brightness_analyzer, make_root
from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.data.index import load_nih
from chestxray.errors import DatasetError
from chestxray.evaluation.localization import (
    Box,
    iobb,
    localization_markdown,
    map_boxes,
    peak_pixel,
    pointing_hit,
    random_map,
    read_boxes,
    score_localization,
    score_map,
)
from chestxray.inference.predict import Analyzer

# One torch thread per test module (see conftest.single_torch_thread).
pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---- the box file ------------------------------------------------------------------


def test_reads_the_nih_box_file_as_shipped(mini_root):
    entries = read_boxes(mini_root / "BBox_List_2017.csv")
    assert len(entries) == 21  # header with trailing empty columns skipped
    first = entries[0]
    assert first.image == "00013125_000.png" and first.finding == "Cardiomegaly"
    assert first.box == Box(169.04126984127, 406.349206349206, 662.078306878307, 418.268783068783)
    findings = {e.finding for e in entries}
    assert "Infiltration" in findings and "Infiltrate" not in findings
    assert findings <= {"Cardiomegaly", "Infiltration", "Nodule", "Pneumonia"}


@pytest.mark.parametrize(
    "row, message",
    [
        ("a.png,Cardiomegaly,1,2,three,4", "not numbers"),
        ("a.png,Heartache,1,2,3,4", "Heartache"),
        ("a.png,Mass,1,2,0,4", "positive size"),
        ("a.png,Mass,1,2", "expected image, finding"),
    ],
)
def test_bad_box_rows_name_the_line(tmp_path, row, message):
    path = tmp_path / "boxes.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\nb.png,Mass,1,2,3,4\n" + row + "\n")
    with pytest.raises(DatasetError, match=message) as err:
        read_boxes(path)
    assert "line 3" in str(err.value)


# ---- pure scoring -------------------------------------------------------------------


def test_iobb_is_intersection_over_the_predicted_box():
    truth = Box(5, 5, 10, 10)
    assert iobb(Box(0, 0, 10, 10), truth) == pytest.approx(25 / 100)
    assert iobb(Box(6, 6, 2, 2), truth) == 1.0  # inside the truth: 1 whatever its size
    assert iobb(Box(0, 0, 40, 40), truth) == pytest.approx(100 / 1600)
    assert iobb(Box(20, 20, 5, 5), truth) == 0.0
    assert Box(1, 2, 3, 4).scaled(0.5, 2) == Box(0.5, 4, 1.5, 8)


def test_map_boxes_around_connected_regions():
    m = np.zeros((50, 60), np.float32)
    m[5:10, 8:20] = 1.0  # rows 5-9, cols 8-19
    m[30:40, 40:45] = 0.6
    m[45:48, 2:4] = 0.3  # below threshold 0.5 of the max
    assert map_boxes(m, 0.5) == [Box(8, 5, 12, 5), Box(40, 30, 5, 10)]
    assert len(map_boxes(m, 0.2)) == 3
    assert map_boxes(m * 7.0, 0.5) == map_boxes(m, 0.5)  # relative to the maximum
    diag = np.zeros((10, 10))
    diag[2, 2] = diag[3, 3] = 1.0  # touching corners: one 8-connected region
    assert map_boxes(diag, 0.5) == [Box(2, 2, 2, 2)]
    assert map_boxes(np.zeros((5, 5)), 0.5) == [] and map_boxes(-np.ones((5, 5)), 0.5) == []


def test_pointing_game():
    m = np.zeros((40, 40), np.float32)
    m[30, 10] = 1.0
    assert peak_pixel(m) == (30, 10)
    assert pointing_hit(m, Box(5, 25, 10, 10))  # x 5..15, y 25..35 holds col 10, row 30
    assert not pointing_hit(m, Box(20, 25, 10, 10))
    assert not pointing_hit(np.zeros((40, 40)), Box(0, 0, 40, 40))  # points nowhere
    plateau = np.zeros((40, 40))
    plateau[20:30, 0:10] = 1.0  # a flat maximum: its centre, not its first pixel, counts
    assert peak_pixel(plateau) in {(24, 4), (24, 5), (25, 4), (25, 5)}
    assert pointing_hit(plateau, Box(2, 22, 6, 6)) and not pointing_hit(plateau, Box(0, 20, 1, 1))


def test_score_map_known_answers():
    truth = Box(20, 10, 20, 10)  # cols 20-39, rows 10-19
    exact = np.zeros((60, 80), np.float32)
    exact[10:20, 20:40] = 1.0
    assert score_map(exact, truth) == {"pointing": 1.0, "iobb@0.1": 1.0, "iobb@0.25": 1.0, "iobb@0.5": 1.0}
    shifted = np.zeros((60, 80), np.float32)
    shifted[10:20, 30:50] = 1.0  # half on the box: IoBB 0.5
    assert score_map(shifted, truth) == {"pointing": 1.0, "iobb@0.1": 1.0, "iobb@0.25": 1.0, "iobb@0.5": 1.0}
    quarter = np.zeros((60, 80), np.float32)
    quarter[15:25, 35:55] = 1.0  # 5 x 5 of its 10 x 20 on the box (1/8); its centre lies outside
    assert score_map(quarter, truth) == {"pointing": 0.0, "iobb@0.1": 1.0, "iobb@0.25": 0.0, "iobb@0.5": 0.0}
    flat = np.ones((60, 80), np.float32)  # one box = the whole image: IoBB = 200 / 4800
    assert score_map(flat, truth)["iobb@0.1"] == 0.0
    assert score_map(flat, truth, iobb_thresholds=(0.04,)) == {"pointing": 0.0, "iobb@0.04": 1.0}
    # any predicted box may hit: a far false region does not spoil a true one
    two = exact.copy()
    two[40:60, 0:20] = 1.0
    assert score_map(two, truth)["iobb@0.5"] == 1.0


def test_random_maps_are_seeded_coarse_and_in_range():
    a = random_map((100, 150), (7, 7), np.random.default_rng(3))
    b = random_map((100, 150), (7, 7), np.random.default_rng(3))
    c = random_map((100, 150), (7, 7), np.random.default_rng(4))
    assert a.shape == (100, 150) and a.min() >= 0 and a.max() == pytest.approx(1.0)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(np.diff(a, axis=1)).max() < 0.2  # smooth: bilinear over a 7 x 7 grid


# ---- the protocol -------------------------------------------------------------------


@pytest.fixture()
def square_root(tmp_path):
    """Three 256-px images (box frame 1024 -> scale 0.25) with bright squares.

    a.png: bright square on its Cardiomegaly box (image rows 64-128, cols 128-192, i.e.
    exactly 2 x 2 cells of the 8 x 8 CAM grid) -> a hit everywhere.
    b.png: its Mass box lies on the dark half, its square elsewhere -> a miss everywhere.
    c.png: in train_val; scored only when the split allows it.
    """
    a = np.zeros((256, 256), np.uint8)
    a[64:128, 128:192] = 255
    b = np.zeros((256, 256), np.uint8)
    b[160:224, 32:96] = 255
    c = a.copy()
    root = make_root(
        tmp_path / "root",
        {"a.png": a, "b.png": b, "c.png": c},
        {"a.png": "Cardiomegaly", "b.png": "Mass", "c.png": "Cardiomegaly"},
        test=["a.png", "b.png"],
    )
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "a.png,Cardiomegaly,512,256,256,256\n"
        "b.png,Mass,600,100,300,300\n"
        "c.png,Infiltrate,512,256,256,256\n"
        "elsewhere.png,Nodule,10,10,50,50\n"
    )
    return root


def test_protocol_known_answer(square_root):
    analyzer = brightness_analyzer()
    index = load_nih(square_root)
    result = score_localization(analyzer, index, square_root / "BBox_List_2017.csv", split="test", seed=1)
    json.dumps(result)  # JSON-able
    assert result["model"] == "brightness-test-model" and result["split"] == "test"
    assert result["images"] == 2 and result["boxes"] == 2 and result["note"] == NOT_FOR_CLINICAL_USE
    assert result["method"]["random"]["grid"] == [8, 8] and result["method"]["threshold"] == 0.5
    per = result["per_finding"]
    assert set(per) == {"Cardiomegaly", "Mass"}
    assert per["Cardiomegaly"]["cam"] == {"pointing": 1.0, "iobb@0.1": 1.0, "iobb@0.25": 1.0, "iobb@0.5": 1.0}
    assert per["Mass"]["cam"] == {"pointing": 0.0, "iobb@0.1": 0.0, "iobb@0.25": 0.0, "iobb@0.5": 0.0}
    assert result["overall"]["cam"]["pointing"] == 0.5 and result["overall"]["boxes"] == 2
    # the random baseline: box of 1/16 of the image, so pointing hits are rare but possible
    rand = result["overall"]["random"]
    assert 0.0 <= rand["pointing"] < 0.5 and all(0.0 <= v <= 1.0 for v in rand.values())
    again = score_localization(analyzer, index, square_root / "BBox_List_2017.csv", split="test", seed=1)
    assert again == result
    # all splits: c.png's "Infiltrate" box counts as Infiltration and hits like a.png's
    everything = score_localization(analyzer, index, square_root / "BBox_List_2017.csv")
    assert everything["split"] == "all" and everything["boxes"] == 3
    assert everything["per_finding"]["Infiltration"]["cam"]["iobb@0.5"] == 1.0
    assert score_localization(analyzer, index, square_root / "BBox_List_2017.csv", split="train")["boxes"] == 1


def test_protocol_on_the_repo_subset_with_the_tiny_bundle(tiny_bundle, mini_root):
    analyzer = Analyzer.load(tiny_bundle)
    index = load_nih(mini_root)
    result = score_localization(analyzer, index, mini_root / "BBox_List_2017.csv", split="test", random_draws=3)
    assert result["boxes"] == 21 and result["images"] == 20  # one image has two boxes
    assert sum(b["boxes"] for b in result["per_finding"].values()) == 21
    assert result["per_finding"]["Pneumonia"]["boxes"] == 15
    assert result["method"]["random"]["grid"] == [2, 2]  # resnet18 at 64 px
    for block in [result["overall"], *result["per_finding"].values()]:
        for side in ("cam", "random"):
            assert set(block[side]) == {"pointing", "iobb@0.1", "iobb@0.25", "iobb@0.5"}
            assert all(0.0 <= v <= 1.0 for v in block[side].values())
    md = localization_markdown(result)
    assert "| Pneumonia | 15 |" in md and "**all boxes**" in md and "tiny-test-model" in md
    cam, rnd = result["overall"]["cam"]["pointing"], result["overall"]["random"]["pointing"]
    assert f"| **all boxes** | 21 | {cam:.2f} / {rnd:.2f} |" in md
    assert NOT_FOR_CLINICAL_USE in md and "0.5" in md


def test_markdown_when_nothing_matches(square_root, tmp_path):
    boxes = tmp_path / "none.csv"
    boxes.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\nzzz.png,Mass,1,2,3,4\n")
    result = score_localization(brightness_analyzer(), load_nih(square_root), boxes)
    assert result["boxes"] == 0 and result["per_finding"] == {} and result["overall"]["cam"] == {}
    md = localization_markdown(result)
    assert "nothing was scored" in md and NOT_FOR_CLINICAL_USE in md
