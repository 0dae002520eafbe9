"""The NIH index on the repository's real subset: labels file variants, image layouts,
official split, validation carved by patient, and every way a root can be unusable."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from chestxray.data.index import carve_validation, load_nih, scan_images
from chestxray.errors import DatasetError, LabelError
from chestxray.labels import FINDINGS

SIDE_FILES = ("train_val_list.txt", "test_list.txt")


def mini_images(mini_root: Path) -> dict[str, Path]:
    """The 93 listed images of the mini root by name."""
    return {p.name: p for p in sorted((mini_root / "images").glob("*.png"))}


def make_root(
    tmp: Path,
    mini_root: Path,
    *,
    csv_name: str = "Data_Entry_2017_v2020.csv",
    csv_lines: list[str] | None = None,
    layout: str = "flat",
    skip: int = 0,
) -> Path:
    """A dataset root in tmp: the mini labels (optionally edited), the split lists and
    symlinks to the real images, `flat` under images/ or Kaggle-style `nested`."""
    root = tmp / "root"
    root.mkdir()
    lines = csv_lines if csv_lines is not None else (mini_root / "Data_Entry_2017.csv").read_text().splitlines()
    text = "\n".join(lines) + "\n"
    if csv_name.endswith(".gz"):
        (root / csv_name).write_bytes(gzip.compress(text.encode()))
    else:
        (root / csv_name).write_text(text)
    for name in SIDE_FILES:
        shutil.copy(mini_root / name, root / name)
    images = sorted(mini_images(mini_root).items())[skip:]
    for k, (name, src) in enumerate(images):
        folder = root / "images" if layout == "flat" else root / f"images_{1 + k % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(src.resolve())
    return root


def test_mini_root_index(mini_root):
    index = load_nih(mini_root)
    frame = index.frame
    assert len(index) == 93 and index.n_label_rows == 93 and index.images_found == 93
    assert index.labels.shape == (93, 14) and index.pathologies == FINDINGS
    assert set(frame["split"]) == {"train", "val", "test"}
    assert int((frame["split"] == "test").sum()) == 30
    assert int(frame["split"].isin(["train", "val"]).sum()) == 63
    assert index.patient_overlap() == {"train-val": 0, "train-test": 0, "val-test": 0}
    # Rows agree with the CSV: labels, patient key without zero padding, real files.
    row = frame.index[frame["image"] == "00000377_000.png"][0]
    assert index.labels[row].tolist() == [float(f == "Cardiomegaly") for f in FINDINGS]
    assert frame.loc[row, "patient_id"] == "377" and frame.loc[row, "view"] == "PA"
    assert all(Path(p).is_file() for p in frame["path"])
    # The first copy by folder name wins: images/ (256 px) before originals/ (1024 px).
    paths = dict(index.iter_paths())
    assert paths["00001369_000.png"].parent.name == "images"
    assert len(paths) == 93
    positions = np.concatenate([index.split_positions(s) for s in ("train", "val", "test")])
    assert sorted(positions.tolist()) == list(range(93))
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        index.split_positions("dev")


@pytest.mark.parametrize("variant", ["first-release", "first-release-gz", "v2020-gz", "header-without-comma"])
def test_both_labels_file_variants_give_the_same_index(tmp_path, mini_root, variant):
    lines = (mini_root / "Data_Entry_2017.csv").read_text().splitlines()
    if variant.startswith("first-release"):
        # As NIH shipped it in 2017: every line, the header too, ends with a comma.
        lines = [line + "," for line in lines]
        name = "Data_Entry_2017.csv.gz" if variant.endswith("gz") else "Data_Entry_2017.csv"
    elif variant == "header-without-comma":
        lines = [lines[0]] + [line + "," for line in lines[1:]]
        name = "Data_Entry_2017.csv"
    else:
        name = "Data_Entry_2017_v2020.csv.gz"
    root = make_root(tmp_path, mini_root, csv_name=name, csv_lines=lines)
    want, got = load_nih(mini_root), load_nih(root)
    assert got.labels_file.name == name
    assert got.frame["image"].tolist() == want.frame["image"].tolist()
    assert got.frame["split"].tolist() == want.frame["split"].tolist()
    assert got.frame["patient_id"].tolist() == want.frame["patient_id"].tolist()
    np.testing.assert_array_equal(got.labels, want.labels)
    assert not any(str(c).startswith("Unnamed") for c in got.frame.columns)


def test_2020_revision_is_preferred_when_both_files_exist(tmp_path, mini_root):
    root = make_root(tmp_path, mini_root)
    lines = (mini_root / "Data_Entry_2017.csv").read_text().splitlines()
    lines[1] = lines[1].replace("Cardiomegaly", "Hernia", 1)  # the old file says something else
    (root / "Data_Entry_2017.csv").write_text("\n".join(line + "," for line in lines) + "\n")
    index = load_nih(root)
    assert index.labels_file.name == "Data_Entry_2017_v2020.csv"
    assert index.labels[index.frame["image"] == "00000377_000.png"][0, 1] == 1.0  # Cardiomegaly


def test_kaggle_nested_layout(tmp_path, mini_root):
    root = make_root(tmp_path, mini_root, layout="nested")
    # Kaggle unpacks real files, not links: copy a few in place of their links.
    for link in sorted((root / "images_001" / "images").iterdir())[:3]:
        target = link.resolve()
        link.unlink()
        shutil.copy(target, link)
    index = load_nih(root)
    assert index.images_found == 93
    parents = {Path(p).parent.relative_to(root).as_posix() for p in index.frame["path"]}
    assert parents == {"images_001/images", "images_002/images"}
    assert index.frame["split"].tolist() == load_nih(mini_root).frame["split"].tolist()


def test_missing_images_error_names_count_and_files(tmp_path, mini_root, caplog):
    root = make_root(tmp_path, mini_root, skip=4)
    gone = sorted(mini_images(mini_root))[:4]
    with pytest.raises(DatasetError) as info:
        load_nih(root)
    msg = str(info.value)
    assert "4 of 93 listed images are missing" in msg and gone[0] in msg and "allow_missing=True" in msg

    with caplog.at_level(logging.WARNING, logger="chestxray.data.index"):
        subset = load_nih(root, allow_missing=True)
    assert len(subset) == 89 and subset.skipped_missing == 4 and subset.missing == gone
    assert "4 listed images are missing" in caplog.text and "the 89 present" in caplog.text
    assert not set(gone) & set(subset.frame["image"])
    assert subset.labels.shape == (89, 14)
    # Metadata only keeps every row, with no path for the missing ones.
    meta = load_nih(root, require_images=False)
    assert len(meta) == 93 and meta.images_found == 89
    assert meta.summary()["images_missing"] == 4
    # A patient's side does not depend on which of its images are on disk.
    split = dict(zip(meta.frame["image"], meta.frame["split"]))
    assert all(split[n] == s for n, s in zip(subset.frame["image"], subset.frame["split"]))


def test_metadata_only_root_has_zero_images(tmp_path, mini_root):
    root = tmp_path / "meta"
    root.mkdir()
    shutil.copy(mini_root / "Data_Entry_2017.csv", root)
    for name in SIDE_FILES:
        shutil.copy(mini_root / name, root)
    summary = load_nih(root, require_images=False).summary()
    assert summary["images_found"] == 0 and summary["images_missing"] == 93
    assert summary["official"] == {"train_val": 63, "test": 30}
    assert summary["splits"]["test"]["images_found"] == 0


def test_validation_carved_by_patient(mini_root):
    index = load_nih(mini_root, val_fraction=0.25, seed=3)
    frame = index.frame
    sides = frame.groupby("patient_id")["split"].nunique()
    assert (sides == 1).all()  # every patient's images stay on one side
    assert index.patient_overlap() == {"train-val": 0, "train-test": 0, "val-test": 0}
    tv_patients = frame.loc[frame["split"].isin(["train", "val"]), "patient_id"].nunique()
    val_patients = frame.loc[frame["split"] == "val", "patient_id"].nunique()
    assert val_patients == round(0.25 * tv_patients)
    # Official test rows never move.
    assert (
        frame.loc[frame["split"] == "test", "image"].tolist()
        == load_nih(mini_root).frame.loc[lambda f: f["split"] == "test", "image"].tolist()
    )


def test_validation_carve_is_seeded():
    patients = np.array([str(i) for i in range(200)] * 2)
    a, b = carve_validation(patients, 0.1, seed=1), carve_validation(patients[::-1], 0.1, seed=1)
    assert a == b and len(a) == 20  # same set whatever the row order
    assert carve_validation(patients, 0.1, seed=2) != a
    assert carve_validation(patients, 0.0, seed=1) == set()
    assert len(carve_validation(np.array(["1", "2"]), 0.9, seed=0)) == 1  # one always left for training
    assert len(carve_validation(np.array(["1", "2", "3"]), 0.01, seed=0)) == 1
    with pytest.raises(DatasetError, match="validation fraction"):
        carve_validation(patients, 1.0, seed=0)
    s1 = load_nih(Path(__file__).parent / "data" / "nih-mini", seed=5).frame["split"].tolist()
    s2 = load_nih(Path(__file__).parent / "data" / "nih-mini", seed=5).frame["split"].tolist()
    s3 = load_nih(Path(__file__).parent / "data" / "nih-mini", seed=6).frame["split"].tolist()
    assert s1 == s2 and s1 != s3


def test_unknown_label_names_row_and_label(tmp_path, mini_root):
    lines = (mini_root / "Data_Entry_2017.csv").read_text().splitlines()
    image = lines[5].split(",")[0]
    lines[5] = lines[5].replace(lines[5].split(",")[1], "Mass|Covid-19", 1)
    root = make_root(tmp_path, mini_root, csv_lines=lines)
    with pytest.raises(LabelError, match=rf"line 6 \({image}\): unknown label 'Covid-19'"):
        load_nih(root)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no-labels-file", "no labels file found"),
        ("no-test-list", "test_list.txt: official split list not found"),
        ("in-both-lists", "in both train_val_list.txt and test_list.txt"),
        ("duplicate-row", "is listed twice"),
        ("missing-column", "missing column 'Patient ID'"),
    ],
)
def test_unusable_roots(tmp_path, mini_root, damage, message):
    root = make_root(tmp_path, mini_root)
    csv = root / "Data_Entry_2017_v2020.csv"
    lines = csv.read_text().splitlines()
    if damage == "no-labels-file":
        csv.unlink()
    elif damage == "no-test-list":
        (root / "test_list.txt").unlink()
    elif damage == "in-both-lists":
        with open(root / "test_list.txt", "a") as f:
            f.write((root / "train_val_list.txt").read_text().splitlines()[0] + "\n")
    elif damage == "duplicate-row":
        csv.write_text("\n".join(lines + [lines[3]]) + "\n")
    elif damage == "missing-column":
        csv.write_text("\n".join([lines[0].replace("Patient ID", "Patient")] + lines[1:]) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_nih(root)
    with pytest.raises(DatasetError, match="not a directory"):
        load_nih(root / "nowhere")


def test_rows_outside_both_lists_are_left_out(tmp_path, mini_root, caplog):
    root = make_root(tmp_path, mini_root)
    lists = (root / "test_list.txt").read_text().splitlines()
    (root / "test_list.txt").write_text("\n".join(lists[2:]) + "\n")
    with caplog.at_level(logging.WARNING, logger="chestxray.data.index"):
        index = load_nih(root)
    assert len(index) == 91 and index.unlisted == 2 and index.summary()["unlisted_rows"] == 2
    assert "2 label rows are in neither split list" in caplog.text
    assert not set(lists[:2]) & set(index.frame["image"])


def test_scan_survives_symlink_loops_and_skips_hidden_folders(tmp_path, mini_root):
    root = make_root(tmp_path, mini_root)
    (root / "images" / "loop").symlink_to(root, target_is_directory=True)
    hidden = root / ".chestxray-cache"
    hidden.mkdir()
    shutil.copy(mini_root / "originals" / "00000001_000.png", hidden / "stray_000.png")
    found = scan_images(root)
    assert len(found) == 93 and "stray_000.png" not in found


# -- opt-in: the full metadata of the real dataset ---------------------------------------------

NIH_META = os.environ.get("CHESTXRAY_NIH_META")


@pytest.mark.skipif(not NIH_META, reason="set CHESTXRAY_NIH_META to the full NIH metadata root")
def test_full_nih_metadata_official_split():
    index = load_nih(NIH_META, require_images=False)
    s = index.summary()
    assert s["label_rows"] == 112_120 and s["patients"] == 30_805
    assert s["official"] == {"train_val": 86_524, "test": 25_596}
    assert s["patient_overlap"] == {"train-val": 0, "train-test": 0, "val-test": 0}
    assert s["splits"]["test"]["patients"] == 2_797
    assert s["splits"]["test"]["no_finding"] == pytest.approx(0.385, abs=0.001)
    assert s["splits"]["train"]["images"] + s["splits"]["val"]["images"] == 86_524


def test_utf8_bom_in_split_lists_keeps_the_first_image(tmp_path, mini_root):
    """Windows editors start a text file with a UTF-8 BOM; the first listed image must
    still match its label row (it was silently dropped: 92 of 93)."""
    root = make_root(tmp_path, mini_root)
    firsts = []
    for name in SIDE_FILES:
        text = (root / name).read_text()
        firsts.append(text.split()[0])
        (root / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    index = load_nih(root)
    assert len(index) == 93 and index.unlabelled == 0
    names = set(index.frame["image"])
    assert all(first in names for first in firsts)


def test_info_without_pandas_names_the_extra(mini_root, monkeypatch, capsys):
    import sys

    from chestxray.cli import main

    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` raises ImportError
    assert main(["info", str(mini_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'chestxray[data]'" in err and "pandas" in err
