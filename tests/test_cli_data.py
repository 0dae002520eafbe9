"""`chestxray info` and `chestxray prepare` on the real mini subset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chestxray.cli import main
from chestxray.data.cache import PreparedCache
from chestxray.labels import FINDINGS


def link_root(tmp_path: Path, mini_root: Path) -> Path:
    """A writable copy of the mini root: side files copied, images symlinked."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    for name in ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt"):
        shutil.copy(mini_root / name, root / name)
    for src in sorted((mini_root / "images").glob("*.png")):
        (root / "images" / src.name).symlink_to(src.resolve())
    return root


def test_info_json_numbers(mini_root, capsys):
    assert main(["info", str(mini_root), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["label_rows"], s["images_found"], s["images_missing"], s["patients"]) == (93, 93, 0, 68)
    assert s["labels_file"] == "Data_Entry_2017.csv"
    assert s["official"] == {"train_val": 63, "test": 30}
    splits = s["splits"]
    assert splits["train"]["images"] + splits["val"]["images"] == 63 and splits["test"]["images"] == 30
    assert splits["test"]["patients"] == 28 and splits["val"]["patients"] >= 1
    assert sum(sp["patients"] for sp in splits.values()) == 68  # no patient counted twice
    assert s["patient_overlap"] == {"train-val": 0, "train-test": 0, "val-test": 0}
    assert list(splits["test"]["prevalence"]) == list(FINDINGS)
    assert splits["test"]["prevalence"]["Pneumonia"] == pytest.approx(21 / 30, abs=1e-4)
    assert splits["test"]["no_finding"] == pytest.approx(1 / 30, abs=1e-4)
    # The validation options reach the carve.
    assert main(["info", str(mini_root), "--json", "--val-fraction", "0.3", "--split-seed", "4"]) == 0
    s2 = json.loads(capsys.readouterr().out)
    assert s2["validation"] == {"fraction": 0.3, "seed": 4, "by": "patient"}
    assert s2["splits"]["val"]["patients"] == round(0.3 * 40)


def test_info_table(mini_root, capsys):
    assert main(["info", str(mini_root)]) == 0
    out = capsys.readouterr().out
    assert "93 found, 0 missing" in out and "train_val 63 / test 30 images" in out
    assert "patient overlap train-val: 0, train-test: 0, val-test: 0  OK" in out
    pneumonia = next(line for line in out.splitlines() if line.strip().startswith("Pneumonia"))
    assert pneumonia.split()[-1] == "70.00%"


def test_info_flags_a_patient_on_both_sides(tmp_path, mini_root, capsys):
    root = link_root(tmp_path, mini_root)
    train_val = (root / "train_val_list.txt").read_text().split()
    train_val.remove("00001543_003.png")  # one of patient 1543's eight images moves to test
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    with open(root / "test_list.txt", "a") as f:
        f.write("00001543_003.png\n")
    assert main(["info", str(root)]) == 1
    out = capsys.readouterr().out
    assert "LEAK: patients on two sides" in out


def test_info_errors_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "chestxray info: error:" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "no labels file found" in capsys.readouterr().err


def test_info_metadata_only_root_as_a_subprocess(tmp_path, mini_root):
    root = tmp_path / "meta"
    root.mkdir()
    for name in ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt"):
        shutil.copy(mini_root / name, root / name)
    run = subprocess.run(
        [sys.executable, "-m", "chestxray.cli", "info", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    s = json.loads(run.stdout)
    assert s["images_found"] == 0 and s["images_missing"] == 93 and s["official"]["test"] == 30


def test_prepare_lists_bad_files_and_caches_the_rest(tmp_path, mini_root, capsys):
    root = link_root(tmp_path, mini_root)
    images = root / "images"
    (images / "00000377_000.png").unlink()
    (images / "00000377_000.png").write_bytes(b"")
    (images / "00001383_000.png").unlink()
    (images / "00001383_000.png").write_text("not an image at all\n")
    cache = tmp_path / "cache"
    args = ["prepare", str(root), "--cache", str(cache), "--size", "32", "--workers", "2"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert f"cache {cache / '32'}: 91 of 93 images ready (91 decoded now, 0 already done)" in out
    assert "2 files could not be read" in err
    assert f"{images / '00000377_000.png'}: empty file" in err
    assert f"{images / '00001383_000.png'}: not a PNG, JPEG or DICOM image" in err
    opened = PreparedCache.open(cache, 32)
    assert int(opened.done.sum()) == 91 and set(opened.failed) == {"00000377_000.png", "00001383_000.png"}
    # Re-running decodes nothing new and still reports the two.
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "91 of 93 images ready (0 decoded now, 91 already done)" in out and "2 files" in err
    # Deleting them and allowing missing images gives a clean cache of the rest.
    (images / "00000377_000.png").unlink()
    (images / "00001383_000.png").unlink()
    assert main(args) == 2
    assert "2 of 93 listed images are missing" in capsys.readouterr().err
    assert main(args + ["--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 listed images that are missing" in out and "91 of 91 images ready" in out
    assert PreparedCache.open(cache, 32).done.all()


def test_prepare_default_cache_goes_to_the_user_cache(tmp_path, mini_root, capsys, monkeypatch):
    from chestxray.data.cache import default_cache_dir

    monkeypatch.delenv("CHESTXRAY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = link_root(tmp_path, mini_root)
    assert main(["prepare", str(root), "--size", "16", "--workers", "1"]) == 0
    assert "93 of 93 images ready" in capsys.readouterr().out
    cache = PreparedCache.open(default_cache_dir(root), 16)
    assert cache.images.shape == (93, 16, 16) and cache.images[0].std() > 0
    assert not (root / ".chestxray-cache").exists()
    assert main(["prepare", str(root), "--size", "4"]) == 2
    assert "cache size must be between 8 and 2048" in capsys.readouterr().err


# -- opt-in: the 1,350-image real sample -------------------------------------------------------

SAMPLE_ROOT = os.environ.get("CHESTXRAY_SAMPLE_ROOT")


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE_ROOT, reason="set CHESTXRAY_SAMPLE_ROOT to the 1,350-image NIH sample")
def test_sample_root_all_found_and_prepared(tmp_path, capsys):
    assert main(["info", str(SAMPLE_ROOT), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["images_found"] == 1_350 and s["images_missing"] == 0 and s["patients"] == 1_064
    assert s["official"] == {"train_val": 1_165, "test": 185}
    assert not any(s["patient_overlap"].values())
    assert main(["prepare", str(SAMPLE_ROOT), "--cache", str(tmp_path), "--workers", "2"]) == 0
    assert "1,350 of 1,350 images ready" in capsys.readouterr().out
    cache = PreparedCache.open(tmp_path, 224)
    assert cache.done.all() and cache.images.shape == (1_350, 224, 224)
    assert float(np.asarray(cache.images[::50]).std()) > 10


def test_atomic_write_gives_normal_file_mode(tmp_path):
    import os

    from chestxray.io import atomic_write_text

    path = atomic_write_text(tmp_path / "x.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert not list(tmp_path.glob(".x.json.*"))  # no temp file left behind


def test_cli_choices_come_from_the_source_tuples():
    """argparse choices are the library's own tuples, not copies that can drift."""
    import argparse

    from chestxray.cli import build_parser
    from chestxray.commands.predict import FORMATS
    from chestxray.data.index import ALL_SPLITS, TUNING_SPLITS
    from chestxray.export.quantize import CALIBRATION_METHODS
    from chestxray.inference.predict import BACKENDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    choices = {
        (name, opt): action.choices
        for name, p in sub.choices.items()
        for action in p._actions
        for opt in action.option_strings
        if action.choices is not None
    }
    assert choices[("evaluate", "--split")] is ALL_SPLITS and choices[("tune", "--split")] is ALL_SPLITS
    assert choices[("report", "--split")] is ALL_SPLITS
    assert choices[("ensemble", "--split")] is TUNING_SPLITS and "test" not in TUNING_SPLITS
    assert choices[("export", "--calibration-method")] is CALIBRATION_METHODS
    assert choices[("predict", "--format")] is FORMATS
    assert all(choices[(c, "--backend")] is BACKENDS for c in ("predict", "serve", "evaluate", "report"))
