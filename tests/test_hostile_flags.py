"""Flag values and label files that used to be taken as they came or echoed without bound
(found by benchmarks/hostile_corpus.py): each is refused in one bounded line."""

from __future__ import annotations

from pathlib import Path

import pytest

from chestxray.cli import main
from chestxray.data.common import read_csv
from chestxray.errors import DatasetError
from chestxray.evaluation.thresholds import parse_policy

IMAGE = str(sorted((Path(__file__).parent / "data" / "nih-mini" / "images").glob("*.png"))[0])


def usage_error(capsys, argv: list[str], needle: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and needle in last, last
    return last


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_predict_progress_every_must_be_a_finite_number(capsys, value):
    usage_error(capsys, ["predict", IMAGE, "--progress-every", value], "--progress-every: must be a finite number >= 0")


def test_evaluate_bootstrap_must_not_be_negative(capsys, tmp_path):
    usage_error(capsys, ["evaluate", "root", "--bootstrap", "-1"], "--bootstrap: must be 0 or more, got -1")


def test_a_label_file_that_does_not_parse_is_one_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("a\nb\nc,d,e,f\n")  # pandas' C parser: "Expected 1 fields in line 3, saw 4\n"
    with pytest.raises(DatasetError) as exc:
        read_csv(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"{path}: cannot parse (ParserError")


def test_a_long_threshold_policy_is_echoed_bounded():
    with pytest.raises(ValueError) as exc:
        parse_policy("x" * 5000)
    assert len(str(exc.value)) < 300 and "'" + "x" * 60 + "...'" in str(exc.value)
