"""Fast encoding of the structured reports of one model.

pydicom takes about 0.1 s of CPU to write one report of ~2,000 elements, more than the
analysis of the image; yet only ~70 of those elements differ from one image to the next. So
the report is encoded once with marker values in those elements (every sequence and item of
undefined length, so no enclosing length depends on them), and each later report is those
bytes with the markers' elements swapped for this image's, encoded here: UI, SH, LO, DS and
FD elements in explicit VR little endian, the only kinds that change (PS3.5 7.1.2). Patient,
study and other top-level elements are encoded by pydicom, one element each. The result is
checked against pydicom's encoding in the tests.
"""

from __future__ import annotations

import datetime
import io
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import DS

from chestxray.pacs import codes as cx
from chestxray.pacs.parts import PATIENT_STUDY, result_uid, text_item

if TYPE_CHECKING:
    from chestxray.inference.predict import Prediction
    from chestxray.pacs.engine import ModelInfo

MARK_STUDY, MARK_SERIES, MARK_SOP, MARK_CLASS = (f"1.2.999.424242.{i}" for i in range(1, 5))
MARK_SCHEME = "99MARK"
CONTENT = Tag(0x0040, 0xA730)
EVIDENCE = Tag(0x0040, 0xA375)
TOP_VARIABLE = {"SOPInstanceUID", "SeriesInstanceUID", "ContentDate", "ContentTime"}
TIMES = ("InstanceCreationDate", "InstanceCreationTime")


def _elem(tag: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def ui(tag: int, uid: str) -> bytes:
    return _elem(tag, "UI", uid.encode("ascii"))


def text(tag: int, vr: str, value: str) -> bytes:
    return _elem(tag, vr, value.encode("ascii"))


def fd(tag: int, value: float) -> bytes:
    return _elem(tag, "FD", struct.pack("<d", value))


def number(probability: float) -> tuple[str, float]:
    """A NUM's (NumericValue, FloatingPointValue), as highdicom writes them."""
    value = round(probability, 6)
    return str(DS(value, auto_format=True)), value


def _encode_element(ds: Dataset, keyword: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, ds[keyword], ["iso8859"])
    return fp.getvalue()


def _undefined_lengths(ds: Dataset) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                _undefined_lengths(item)


def mark(i: int) -> float:
    """The marker probability of the i-th finding."""
    return 0.5 + i / 1000 + 0.000017


def presence_marks(i: int) -> tuple[str, str, str]:
    return f"P{i:02d}", MARK_SCHEME, f"M{i:02d}"


def groups(sr: Dataset) -> Iterator[Dataset]:
    measurements = next(c for c in sr.ContentSequence if c.ValueType == "CONTAINER")
    yield from measurements.ContentSequence


class SrEncoder:
    """Bytes of a report of this model for any source and prediction; None where the
    template cannot be used (then the caller encodes with pydicom)."""

    def __init__(self, info: "ModelInfo", sr: Dataset) -> None:
        """`sr`: a report of this model with the markers in place (SrFactory._marked)."""
        self.info = info
        labels = self.info.labels
        self.marks = {name: mark(i) for i, name in enumerate(labels)}
        _undefined_lengths(sr)
        self.tracking = {n: result_uid(MARK_SOP, self.info.sha256, f"group {n}") for n in labels}
        self.fixed: dict[int, bytes] = {}
        skip = set(PATIENT_STUDY) | TOP_VARIABLE | set(TIMES)
        for elem in sr:
            if elem.keyword not in skip:
                self.fixed[int(elem.tag)] = _encode_element(sr, elem.keyword)
        self.has_times = "InstanceCreationDate" in sr
        self.disclaimer = self._item(sr.ContentSequence[-1])
        self.meta = Dataset()
        self.meta.file_meta = FileMetaDataset(sr.file_meta)
        self.usable = self._check()

    @staticmethod
    def _item(item: Dataset) -> bytes:
        holder = Dataset()
        holder.ContentSequence = DicomSequence([item])
        _undefined_lengths(holder)
        body = _encode_element(holder, "ContentSequence")
        return body[12:-8]  # without the sequence's header and delimiter

    def _check(self) -> bool:
        """Each marker occurs as often as expected: then swapping is exact."""
        content, evidence = self.fixed.get(int(CONTENT), b""), self.fixed.get(int(EVIDENCE), b"")
        n = len(self.info.labels)
        expected = [
            (content, ui(0x00081155, MARK_SOP), n),
            (content, ui(0x00081150, MARK_CLASS), n),
            (evidence, ui(0x00081155, MARK_SOP), 1),
            (evidence, ui(0x00081150, MARK_CLASS), 1),
            (evidence, ui(0x0020000D, MARK_STUDY), 1),
            (evidence, ui(0x0020000E, MARK_SERIES), 1),
            (content, text(0x00080102, "SH", MARK_SCHEME), n),
            (content, self.disclaimer, 1),
        ]
        for i, name in enumerate(self.info.labels):
            ds_value, fd_value = number(self.marks[name])
            expected += [
                (content, ui(0x0040A124, self.tracking[name]), 1),
                (content, text(0x0040A30A, "DS", ds_value), 1),
                (content, fd(0x0040A161, fd_value), 1),
                (content, text(0x00080100, "SH", f"P{i:02d}"), 1),
                (content, text(0x00080104, "LO", f"M{i:02d}"), 1),
            ]
        return all(chunk.count(marker) == count for chunk, marker, count in expected)

    def encode(self, source: Dataset, prediction: "Prediction") -> bytes | None:
        if not self.usable or {f.finding for f in prediction.findings} != set(self.info.labels):
            return None
        sha = self.info.sha256
        sop_uid = result_uid(source.SOPInstanceUID, sha, "sr")
        content = self.fixed[int(CONTENT)]
        by_name = {f.finding: f for f in prediction.findings}
        for i, name in enumerate(self.info.labels):
            f = by_name[name]
            ds_mark, fd_mark = number(self.marks[name])
            ds_value, fd_value = number(f.probability)
            code = cx.PRESENT if f.positive else cx.ABSENT
            for old, new in (
                (
                    ui(0x0040A124, self.tracking[name]),
                    ui(0x0040A124, result_uid(source.SOPInstanceUID, sha, f"group {name}")),
                ),
                (text(0x0040A30A, "DS", ds_mark), text(0x0040A30A, "DS", ds_value)),
                (fd(0x0040A161, fd_mark), fd(0x0040A161, fd_value)),
                (text(0x00080100, "SH", f"P{i:02d}"), text(0x00080100, "SH", code.value)),
                (text(0x00080104, "LO", f"M{i:02d}"), text(0x00080104, "LO", code.meaning)),
            ):
                content = content.replace(old, new)
        content = content.replace(
            text(0x00080102, "SH", MARK_SCHEME), text(0x00080102, "SH", cx.PRESENT.scheme_designator)
        )
        refs = (
            (ui(0x00081155, MARK_SOP), ui(0x00081155, str(source.SOPInstanceUID))),
            (ui(0x00081150, MARK_CLASS), ui(0x00081150, str(source.SOPClassUID))),
        )
        for old, new in refs:
            content = content.replace(old, new)
        if prediction.warnings:
            warnings = b"".join(self._item(text_item(cx.WARNING, w)) for w in prediction.warnings)
            content = content.replace(self.disclaimer, warnings + self.disclaimer)
        evidence = self.fixed[int(EVIDENCE)]
        for old, new in (
            *refs,
            (ui(0x0020000D, MARK_STUDY), ui(0x0020000D, str(source.StudyInstanceUID))),
            (ui(0x0020000E, MARK_SERIES), ui(0x0020000E, str(source.SeriesInstanceUID))),
        ):
            evidence = evidence.replace(old, new)
        top = Dataset()
        for keyword in PATIENT_STUDY:
            if keyword in source:
                top[keyword] = source[keyword]
        top.StudyInstanceUID = source.StudyInstanceUID
        top.SeriesInstanceUID = result_uid(source.StudyInstanceUID, sha, "sr series")
        top.SOPInstanceUID = sop_uid
        now = datetime.datetime.now()
        top.ContentDate, top.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
        if self.has_times:
            top.InstanceCreationDate, top.InstanceCreationTime = top.ContentDate, top.ContentTime
        chunks = dict(self.fixed)
        chunks[int(CONTENT)], chunks[int(EVIDENCE)] = content, evidence
        for elem in top:
            chunks[int(elem.tag)] = _encode_element(top, elem.keyword)
        self.meta.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        out = io.BytesIO()
        out.write(b"\0" * 128 + b"DICM")
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, self.meta.file_meta, enforce_standard=True)
        out.write(meta.getvalue())
        for tag in sorted(chunks):
            out.write(chunks[tag])
        return out.getvalue()
