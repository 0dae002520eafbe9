"""The 14 findings, their order, and parsing of "Finding Labels"."""

from __future__ import annotations

import numpy as np
import pytest

from chestxray.errors import LabelError
from chestxray.labels import (
    FINDINGS,
    canonical_finding,
    format_findings,
    labels_matrix,
    parse_finding_labels,
)


def test_fourteen_findings_in_the_nih_order():
    assert len(FINDINGS) == 14 and len(set(FINDINGS)) == 14
    assert FINDINGS[0] == "Atelectasis" and FINDINGS[1] == "Cardiomegaly" and FINDINGS[-1] == "Hernia"
    assert FINDINGS.index("Pleural_Thickening") == 12


def test_parse_multi_hot_and_no_finding():
    vec = parse_finding_labels("Effusion|Mass")
    assert vec.dtype == np.float32 and vec.shape == (14,)
    assert np.flatnonzero(vec).tolist() == [FINDINGS.index("Effusion"), FINDINGS.index("Mass")]
    assert not parse_finding_labels("No Finding").any()
    assert parse_finding_labels(" Hernia ")[13] == 1.0


def test_unknown_label_names_the_row_and_the_label():
    with pytest.raises(LabelError, match=r"row 7: unknown label 'Pneumonitis'"):
        parse_finding_labels("Mass|Pneumonitis", row=7)
    with pytest.raises(LabelError, match=r"x.csv line 9 \(a.png\): unknown label 'Foo'"):
        labels_matrix(["Mass", "Foo"], rows=["x.csv line 8 (b.png)", "x.csv line 9 (a.png)"])


@pytest.mark.parametrize(
    ("value", "why"),
    [("", "empty 'Finding Labels'"), ("Mass||Edema", "empty label"), ("No Finding|Mass", "together with")],
)
def test_malformed_cells_are_label_errors(value, why):
    with pytest.raises(LabelError, match=why) as info:
        parse_finding_labels(value, row=3)
    assert "row 3" in str(info.value)


def test_labels_matrix_rows_and_empty_input():
    m = labels_matrix(["No Finding", "Cardiomegaly|Edema", "Cardiomegaly|Edema"])
    assert m.shape == (3, 14) and m.dtype == np.float32
    assert m.sum(1).tolist() == [0.0, 2.0, 2.0]
    assert labels_matrix([]).shape == (0, 14)


def test_aliases_and_round_trip():
    assert canonical_finding("Infiltrate") == "Infiltration"
    assert canonical_finding("Pleural Thickening") == "Pleural_Thickening"
    with pytest.raises(LabelError, match="unknown finding 'Covid'"):
        canonical_finding("Covid")
    for text in ("No Finding", "Atelectasis|Hernia", "Mass"):
        assert format_findings(parse_finding_labels(text)) == text
