"""Where evaluate, report, tune and predict --features write is checked before the work: a
file where a folder is wanted, a folder where a file is wanted, or an unwritable place is one
line (exit 2) at once, never a traceback after the whole run (found by
benchmarks/hostile_corpus.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chestxray.cli import main

pytest.importorskip("onnxruntime")

DATA = Path(__file__).parent / "data"
ROOT = f"csv:{DATA / 'csv-mini'}"
ONNX = str(Path(__file__).parents[1] / "src" / "chestxray" / "weights" / "default.onnx")
LOCKED = Path("/sys/chestxray-test-out")  # sysfs refuses new files and folders, even to root


def locked() -> Path:
    try:
        LOCKED.mkdir()
    except OSError:
        return LOCKED
    LOCKED.rmdir()
    pytest.skip(f"{LOCKED.parent} is writable here")


def one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_evaluate_and_report_refuse_a_file_or_an_unwritable_out_folder(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")
    common = [ROOT, "--split", "all", "--backend", "onnx"]
    for argv in (["evaluate", *common, "--bootstrap", "0"], ["report", *common, "--n", "2"]):
        one_line_error(capsys, [*argv, "--out", str(a_file)], f"{a_file}: is a file, not a folder")
        one_line_error(capsys, [*argv, "--out", str(a_file / "sub")], f"{a_file / 'sub'}: cannot write here")
        one_line_error(capsys, [*argv, "--out", str(locked() / "out")], "cannot write here")
    assert a_file.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_tune_refuses_a_folder_or_an_unwritable_out(tmp_path, capsys):
    argv = ["tune", ROOT, "--split", "all", "--model", ONNX, "--out"]
    one_line_error(capsys, [*argv, str(tmp_path)], f"--out {tmp_path}: is a folder")
    one_line_error(capsys, [*argv, str(locked() / "tuned.onnx")], "cannot write here")


def test_predict_features_refuses_a_folder_or_an_unwritable_out(tmp_path, capsys):
    image = str(sorted((DATA / "nih-mini" / "images").glob("*.png"))[0])
    argv = ["predict", "--backend", "onnx", "--no-progress", image, "--features"]
    folder = tmp_path / "vectors.npy"
    folder.mkdir()
    one_line_error(capsys, [*argv, str(folder)], f"--features {folder}: is a folder")
    one_line_error(capsys, [*argv, str(locked() / "vectors.npy")], "cannot write here")
