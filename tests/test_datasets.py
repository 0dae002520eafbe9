"""The dataset registry, its readers (on fixtures in each dataset's real layout, built from
NIH pixels by tests/data/make_fixtures.py) and label harmonisation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from chestxray.cli import main
from chestxray.data.common import DatasetOptions
from chestxray.data.datasets import open_dataset, parse_root
from chestxray.data.harmonise import harmonise, mapping_for, targets_for
from chestxray.data.images import read_image
from chestxray.errors import DatasetError

DATA = Path(__file__).parent / "data"
METADATA = os.environ.get("CHESTXRAY_METADATA_ROOT")
NIH_LABELS = {}


def nih_labels() -> dict[str, str]:
    import csv

    if not NIH_LABELS:
        with open(DATA / "nih-mini" / "Data_Entry_2017.csv", newline="") as fh:
            NIH_LABELS.update({r["Image Index"]: r["Finding Labels"] for r in csv.DictReader(fh)})
    return NIH_LABELS


def test_parse_root_forms(tmp_path):
    assert parse_root("chexpert:/data/chexpert") == ("chexpert", Path("/data/chexpert"))
    assert parse_root("CSV:rel/x.csv") == ("csv", Path("rel/x.csv"))
    assert parse_root("/data/nih") == ("nih", Path("/data/nih"))
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_root(str(odd)) == ("nih", odd)  # an existing folder with a colon stays a path
    with pytest.raises(DatasetError, match=r"unknown dataset 'chexpret'.*known: nih, chexpert"):
        parse_root("chexpret:/data")


def test_harmonisation_tables():
    m = mapping_for("chexpert", ["Pleural Effusion", "Lung Lesion", "No Finding"])
    assert m == {"Pleural Effusion": "Effusion", "Lung Lesion": "Lung Lesion", "No Finding": None}
    assert mapping_for("vindr", ["Nodule/Mass", "Pulmonary fibrosis"]) == {
        "Nodule/Mass": "Nodule or mass",
        "Pulmonary fibrosis": "Fibrosis",
    }
    # Many own names -> one finding: any positive, all negative, else unknown.
    names = ["rib fracture", "clavicle fracture", "normal"]
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, np.nan, 0], [np.nan, 1, 0]], dtype=np.float32)
    findings, matrix, sources = harmonise("padchest", names, labels)
    assert findings == ["Fracture"] and sources == {"Fracture": ["rib fracture", "clavicle fracture"]}
    np.testing.assert_array_equal(matrix[:, 0], [1, 0, np.nan, 1])
    targets, used = targets_for("chexpert", ["Pleural Effusion"], np.array([[1.0]]), ["Effusion", "Mass"])
    np.testing.assert_array_equal(targets, [[1.0, np.nan]])
    assert used == {"Effusion": ["Pleural Effusion"]}


def test_chexpert_fixture_reader():
    opts = DatasetOptions()
    index = open_dataset(f"chexpert:{DATA / 'chexpert-mini'}", opts)
    frame = index.frame
    assert len(index) == 55 and index.images_found == 55
    assert (frame["view"] == "LATERAL").sum() == 1 and frame.loc[frame["view"] == "LATERAL", "frontal"].iloc[0] is False
    assert set(frame.loc[frame["split"] == "val", "image"].str.split("/").str[1]) == {"valid"}
    row = frame.index[frame["image"].str.contains("patient00377/")][0]
    assert frame["patient_id"][row] == "patient00377" and frame["sex"][row] == "F" and frame["age"][row] == 54
    # NIH 'No Finding' rows are written blank in the CheXpert file and filled as negative.
    names = list(index.pathologies)
    healthy = index.labels[:, names.index("No Finding")] == 1
    assert healthy.sum() == 19
    assert (index.labels[healthy][:, names.index("Cardiomegaly")] == 0).all()
    assert np.isnan(index.labels[healthy][:, names.index("Support Devices")]).all()
    # Uncertainty policy on the one -1.
    edema = names.index("Edema")
    uncertain = index.raw[:, edema] == -1
    assert uncertain.sum() == 1 and np.isnan(index.labels[uncertain, edema]).all()
    ones = open_dataset(f"chexpert:{DATA / 'chexpert-mini'}", DatasetOptions(uncertain="ones"))
    assert (ones.labels[uncertain, edema] == 1).all()
    frontal = open_dataset(f"chexpert:{DATA / 'chexpert-mini'}", DatasetOptions(views="frontal"))
    assert len(frontal) == 54 and (frontal.frame["view"] != "LATERAL").all()
    pa = open_dataset(f"chexpert:{DATA / 'chexpert-mini'}", DatasetOptions(views="PA"))
    assert set(pa.frame["view"]) == {"PA"}


def test_chexpert_labels_match_nih_source():
    index = open_dataset(f"chexpert:{DATA / 'chexpert-mini'}", DatasetOptions(views="frontal"))
    findings, matrix, _ = harmonise("chexpert", index.pathologies, index.labels)
    effusion = matrix[:, findings.index("Effusion")]
    import csv

    with open(DATA / "nih-mini" / "Data_Entry_2017.csv", newline="") as fh:
        nih_effusion = {
            (int(r["Patient ID"]), int(r["Follow-up #"])): float("Effusion" in r["Finding Labels"].split("|"))
            for r in csv.DictReader(fh)
        }
    by_name = {}
    for rel in index.frame["image"]:
        patient, study = rel.split("/")[2:4]
        by_name[rel] = (int(patient[7:]), int(study[5:]) - 1)
    assert [nih_effusion[by_name[r]] for r in index.frame["image"]] == effusion.tolist()


def test_wrong_layout_names_the_expected_file(tmp_path):
    with pytest.raises(DatasetError, match=r"CheXpert-v1.0-small/train.csv"):
        open_dataset(f"chexpert:{tmp_path}")
    with pytest.raises(DatasetError, match=r"mimic-cxr-2.0.0-chexpert.csv.gz"):
        open_dataset(f"mimic:{tmp_path}")
    with pytest.raises(DatasetError, match=r"train.csv"):
        open_dataset(f"vindr:{tmp_path}")
    with pytest.raises(DatasetError, match=r"PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"):
        open_dataset(f"padchest:{tmp_path}")
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(f"chexpert:{tmp_path / 'nope'}")


def test_missing_images_named(tmp_path):
    import shutil

    root = tmp_path / "cx"
    shutil.copytree(DATA / "chexpert-mini", root)
    victim = next((root / "CheXpert-v1.0-small" / "valid").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"1 of 55 listed images are missing, e.g. expected .*{victim.name}"):
        open_dataset(f"chexpert:{root}")
    index = open_dataset(f"chexpert:{root}", DatasetOptions(allow_missing=True))
    assert len(index) == 54 and index.skipped_missing == 1


def test_mimic_fixture_reader():
    index = open_dataset(f"mimic:{DATA / 'mimic-mini'}")
    frame = index.frame
    assert len(index) == 12 and index.images_found == 12
    assert frame["image"].str.match(r"files/p10/p100\d{5}/s5\d{7}/[0-9a-f-]+\.jpg$").all()
    assert (frame["split"] == "test").sum() == 4 and set(frame["split"]) == {"train", "val", "test"}
    assert index.patient_overlap() == {"train-val": 0, "train-test": 0, "val-test": 0}
    # Study 50000005 has no label row: unknown everywhere, not negative.
    unlabelled = frame["study_id"] == "50000005"
    assert unlabelled.sum() == 1 and np.isnan(index.labels[unlabelled.to_numpy()]).all()
    assert any("without a row" in n for n in index.notes)
    image = read_image(frame["path"].iloc[0])
    assert image.shape[:2] == (128, 128)


def test_padchest_fixture_reader(caplog):
    index = open_dataset(f"padchest:{DATA / 'padchest-mini'}")
    assert len(index) == 9  # the row with a truncated Labels list is skipped
    assert any("unparseable Labels" in n and "line 10" in n for n in index.notes)
    assert "unparseable" in caplog.text
    assert index.patient_overlap() == {"train-val": 0, "train-test": 0, "val-test": 0}
    frame = index.frame
    assert frame["age"].notna().all() and set(frame["sex"]) <= {"M", "F"}
    from PIL import Image

    with Image.open(frame["path"].iloc[0]) as im:
        assert im.mode.startswith("I")  # 16-bit
    assert read_image(frame["path"].iloc[0]).max() > 0


def test_vindr_fixture_reader():
    index = open_dataset(f"vindr:{DATA / 'vindr-mini'}")
    names = list(index.pathologies)
    assert len(index) == 10 and index.images_found == 10
    any_rule = index.labels.sum()
    majority = open_dataset(f"vindr:{DATA / 'vindr-mini'}", DatasetOptions(vindr_rule="majority"))
    assert majority.labels.sum() <= any_rule and (index.labels >= majority.labels).all()
    assert not np.isnan(index.labels).any()
    assert (index.labels[:, names.index("Atelectasis")] == 1).sum() == 4
    # The DICOMs hold the NIH pixels (one is MONOCHROME1, inverted back by the reader).
    from PIL import Image

    for path in index.frame["path"]:
        img = read_image(path)
        assert img.ndim == 2 and img.shape == (128, 128) and np.ptp(img) > 0
    del Image


def test_vindr_boxes_for_localization():
    import csv
    import gzip

    from chestxray.evaluation.localization import vindr_box_entries

    entries = vindr_box_entries(DATA / "vindr-mini")
    with gzip.open(DATA / "vindr-mini" / "train.csv.gz", "rt") as fh:
        rows = [r for r in csv.DictReader(fh) if r["class_name"] != "No finding"]
    assert len(entries) == len(rows)  # every fixture class maps to a vocabulary finding
    assert {e.finding for e in entries} <= {
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Consolidation",
        "Pleural_Thickening",
        "Fibrosis",
        "Nodule or mass",
    }
    first = rows[0]
    e = entries[0]
    assert e.image == first["image_id"] and e.box.x == float(first["x_min"])
    assert e.box.w == float(first["x_max"]) - float(first["x_min"])


def test_csv_reader_and_its_errors(tmp_path):
    index = open_dataset(f"csv:{DATA / 'csv-mini'}")
    assert len(index) == 12 and set(index.frame["split"]) == {"train", "val", "test"}
    nih = nih_labels()
    for image, row in zip(index.frame["image"], index.labels):
        on = [n for n, v in zip(index.pathologies, row) if v == 1]
        got = "|".join(sorted(on)) or "No Finding"
        assert got == "|".join(sorted(nih[Path(image).name].split("|")))
    # One column per finding, a spec naming the columns, blank = unknown.
    (tmp_path / "images").mkdir()
    src = sorted((DATA / "csv-mini" / "images").glob("*.png"))[:3]
    for p in src:
        (tmp_path / "images" / p.name).write_bytes(p.read_bytes())
    rows = [f"images/{p.name},{v}" for p, v in zip(src, ["1", "0", ""])]
    (tmp_path / "table.csv").write_text("fname,Pleural Effusion\n" + "\n".join(rows) + "\n")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"path": "fname"}))
    index = open_dataset(f"csv:{tmp_path}", DatasetOptions(csv_spec=str(spec)))
    np.testing.assert_array_equal(index.labels[:, 0], [1, 0, np.nan])
    assert mapping_for("csv", index.pathologies) == {"Pleural Effusion": "Effusion"}
    flags = open_dataset(f"csv:{tmp_path}", DatasetOptions(csv_columns="path=fname,findings=Pleural Effusion"))
    np.testing.assert_array_equal(flags.labels[:, 0], [1, 0, np.nan])
    with pytest.raises(DatasetError, match=r"csv_columns=.*: unknown key 'pth'"):
        open_dataset(f"csv:{tmp_path}", DatasetOptions(csv_columns="pth=fname"))
    (tmp_path / "table.csv").write_text("fname,Pleural Effusion\n" + rows[0] + "\n" + rows[1][:-1] + "yes\n")
    with pytest.raises(DatasetError, match=r"table.csv line 3, column 'Pleural Effusion': 'yes' is not 1, 0, -1"):
        open_dataset(f"csv:{tmp_path}", DatasetOptions(csv_spec=str(spec)))
    spec.write_text(json.dumps({"path": "file"}))
    with pytest.raises(DatasetError, match=r"column 'file' \(the spec's 'path'\) not found"):
        open_dataset(f"csv:{tmp_path}", DatasetOptions(csv_spec=str(spec)))


def test_prepare_a_chexpert_root(tmp_path, capsys):
    assert (
        main(
            [
                "prepare",
                f"chexpert:{DATA / 'chexpert-mini'}",
                "--cache",
                str(tmp_path),
                "--size",
                "32",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "54 of 54 images ready" in capsys.readouterr().out  # frontal views by default
    names = (tmp_path / "32" / "names.txt").read_text().splitlines()
    assert names[0].startswith("CheXpert-v1.0-small/train/patient") and not any("lateral" in n for n in names)


def test_info_and_datasets_commands(capsys):
    assert main(["info", f"chexpert:{DATA / 'chexpert-mini'}", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows"] == 55 and s["views"]["lateral"] == 1 and s["patient_overlap"]["train-val"] == 0
    assert s["labels"]["Edema"]["uncertain"] == 1
    assert main(["info", f"vindr:{DATA / 'vindr-mini'}"]) == 0
    out = capsys.readouterr().out
    assert "images with only 'No finding': 4" in out and "patient overlap" in out
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "Pleural Effusion" in out and "-> Effusion" in out and "Nodule or mass = max(Nodule, Mass)" in out


@pytest.mark.slow
@pytest.mark.skipif(not METADATA, reason="set CHESTXRAY_METADATA_ROOT to ../shared/metadata (real label files)")
def test_real_chexpert_train_csv(capsys):
    assert main(["info", f"chexpert:{METADATA}/chexpert", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows"] == 223_414 and s["patients"] == 64_540
    v = s["views"]
    assert (v["frontal"], v["lateral"], v["AP"], v["PA"]) == (191_027, 32_387, 161_590, 29_420)
    assert s["patient_overlap"] == {"train-val": 0, "train-test": 0, "val-test": 0}
    assert any("valid.csv" in m for m in s["missing_files"])  # reported, not fatal
    assert s["labels"]["Pleural Effusion"]["positive"] > 0 and s["labels"]["Atelectasis"]["uncertain"] > 0


@pytest.mark.skipif(not METADATA, reason="set CHESTXRAY_METADATA_ROOT to ../shared/metadata (real label files)")
def test_real_vinbigdata_train_csv(capsys):
    assert main(["info", f"vindr:{METADATA}/vinbigdata", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows"] == 15_000 and "images with only 'No finding': 10,606" in s["notes"]
    assert s["labels"]["Cardiomegaly"]["positive"] == 2_300
    assert s["labels"]["Pleural effusion"]["positive"] == 1_032
    assert s["patient_overlap"] == {"train-val": 0, "train-test": 0, "val-test": 0}


# ---- hostile dataset files: paths outside the root, unbounded PadChest cells -------------------
def _csv_root(tmp_path: Path, paths: list[str], spec: dict | None = None) -> Path:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    src = sorted((DATA / "csv-mini" / "images").glob("*.png"))[0]
    (root / "images" / "a.png").write_bytes(src.read_bytes())
    (root / "labels.csv").write_text("path,Effusion\n" + "".join(f"{p},1\n" for p in paths))
    if spec is not None:
        (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "images/../../x.png"])
def test_csv_image_paths_stay_inside_the_root(tmp_path, bad):
    root = _csv_root(tmp_path, ["images/a.png", bad])
    with pytest.raises(DatasetError, match=r"labels.csv line 3, column 'path': .* is outside the dataset folder"):
        open_dataset(f"csv:{root}", DatasetOptions(allow_missing=True))
    index = open_dataset(f"csv:{root}", DatasetOptions(allow_missing=True, allow_outside_root=True))
    assert len(index) == (2 if Path(bad).is_file() else 1)


def test_csv_spec_labels_file_stays_inside_the_root(tmp_path):
    (tmp_path / "secret.csv").write_text("path,Effusion\nds/images/a.png,1\n")
    root = _csv_root(tmp_path, ["images/a.png"], spec={"file": "../secret.csv"})
    with pytest.raises(DatasetError, match=r"labels file '../secret.csv' is outside the dataset folder"):
        open_dataset(f"csv:{root}")
    (root / "dataset.json").write_text(json.dumps({"file": "../../../../etc/passwd"}))
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        open_dataset(f"csv:{root}")
    (root / "dataset.json").write_text(json.dumps({"file": "../secret.csv"}))
    assert len(open_dataset(f"csv:{root}", DatasetOptions(allow_outside_root=True))) == 1


def test_allow_outside_root_is_a_dataset_flag(tmp_path, capsys):
    root = _csv_root(tmp_path, ["images/a.png", "/etc/passwd"])
    assert main(["info", f"csv:{root}"]) == 2
    assert "--allow-outside-root" in capsys.readouterr().err


def test_csv_spec_yaml_aliases_are_refused(tmp_path):
    root = _csv_root(tmp_path, ["images/a.png"])
    (root / "dataset.yaml").write_text("path: &p path\nlabels: *p\n")
    with pytest.raises(DatasetError, match="aliases"):
        open_dataset(f"csv:{root}")


def test_padchest_hostile_labels_cell_is_a_reported_row(tmp_path, caplog):
    import gzip

    from chestxray.data.datasets.padchest import LABELS_FILE, parse_labels

    assert parse_labels("['pleural effusion', \"cardiomegaly\" , ]") == ["pleural effusion", "cardiomegaly"]
    assert parse_labels("[]") == [] and parse_labels("['a', ['b']]") is None and parse_labels("[1]") is None
    assert parse_labels("[" * 100_000) is None and parse_labels("-" * 100_000 + "1") is None
    with gzip.open(DATA / "padchest-mini" / f"{LABELS_FILE}.gz", "rt") as fh:
        lines = fh.read().splitlines()
    header, first = lines[0], lines[1]
    hostile = first.replace(",['normal'],", "," + "-" * 100_000 + "1,", 1)
    assert hostile != first
    root = tmp_path / "pc"
    root.mkdir()
    (root / LABELS_FILE).write_text("\n".join([header, hostile, *lines[2:]]) + "\n")
    for entry in (DATA / "padchest-mini").iterdir():
        if entry.is_dir():
            (root / entry.name).symlink_to(entry)
    index = open_dataset(f"padchest:{root}")
    note = next(n for n in index.notes if "line 2 (" in n)
    assert len(note) < 400 and "100,001 characters" in note, note


def test_csv_errors_echo_a_bounded_cell(tmp_path):
    root = _csv_root(tmp_path, ["images/a.png"])
    (root / "labels.csv").write_text("path,Effusion\nimages/a.png," + "y" * 100_000 + "\n")
    with pytest.raises(DatasetError) as info:
        open_dataset(f"csv:{root}")
    assert len(str(info.value)) < 400 and "100,000 characters" in str(info.value)


@pytest.mark.parametrize("name", ["vindr", "nih"])
def test_a_root_without_its_images_does_not_offer_the_zero_present(name, tmp_path):
    """Every listed image missing: the error says to check the root, not "--allow-missing to
    use the 0 present"; with some present it still offers --allow-missing."""
    import shutil

    source = Path(__file__).parent / "data" / f"{name}-mini"
    root = tmp_path / name
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("*.png", "*.dicom", "*.dcm", "originals"))
    spec = f"vindr:{root}" if name == "vindr" else str(root)
    with pytest.raises(DatasetError) as err:
        open_dataset(spec, DatasetOptions())
    assert "0 present" not in str(err.value) and "check that the root" in str(err.value)
    one = next(p for p in sorted(source.rglob("*")) if p.suffix in (".png", ".dicom") and "originals" not in p.parts)
    (root / one.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(one, root / one.relative_to(source))
    with pytest.raises(DatasetError, match=r"allow_missing=True\) to use the 1 present"):
        open_dataset(spec, DatasetOptions())
