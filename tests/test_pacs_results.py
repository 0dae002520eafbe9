"""DICOM results without a PACS: `predict --dicom-out`, the SR's codes, and the spool's
journal (dedupe, retries then failed/, 0700). Fast: no Orthanc, the ONNX backend."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pydicom
import pytest

from pacs_fixtures import make_dx, read_sr_findings, write_dx

pytest.importorskip("highdicom")

NIH = Path(__file__).parent / "data" / "nih-mini" / "images"


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's errors ([] where dicom3tools is not installed: `make services` installs it)."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        return []
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_predict_dicom_out_writes_an_sr_with_predicts_numbers(tmp_path):
    from chestxray.cli import main

    dx = write_dx(tmp_path / "dx.dcm", make_dx(NIH / "00000398_000.png", size=256))
    png = NIH / "00000506_013.png"
    out, results = tmp_path / "out.json", tmp_path / "dicom"
    args = ["predict", str(dx), str(png), "--backend", "onnx", "--format", "json", "--out", str(out)]
    assert main([*args, "--dicom-out", str(results), "--no-progress", "--workers", "0"]) == 0
    (sr_path,) = results.glob("*_SR.dcm")  # the PNG has no SR
    sr = pydicom.dcmread(sr_path)
    expected = next(p for p in json.loads(out.read_text()) if p["file"] == str(dx))
    found = read_sr_findings(sr)
    assert {
        f["finding"]: (pytest.approx(f["probability"], abs=1e-4), f["positive"]) for f in expected["findings"]
    } == found
    source = pydicom.dcmread(dx)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SeriesDescription == "chestxray findings"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")


def test_predict_dicom_out_refuses_streaming_formats(tmp_path, capsys):
    from chestxray.cli import main

    dx = write_dx(tmp_path / "dx.dcm", make_dx(NIH / "00000398_000.png", size=64))
    assert main(["predict", str(dx), "--format", "csv", "--dicom-out", str(tmp_path / "d")]) == 2
    assert "--dicom-out works with --format table or json" in capsys.readouterr().err


def test_sr_content_tree_codes_and_device(tmp_path):
    """Every finding's group: SNOMED CT or the declared private scheme, probability in UCUM
    "1", threshold, policy text, presence; a device observer with the model's SHA-256."""
    from chestxray.pacs.engine import Engine
    from chestxray.pacs.results import build_sr

    engine = Engine(None, backend="onnx")
    dx = make_dx(NIH / "00000398_000.png", size=128)
    path = write_dx(tmp_path / "dx.dcm", dx)
    prediction = next(engine.analyse([path], ["x"]))
    sr = build_sr(dx, prediction, engine.info)
    schemes = {sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator, "SCT", "DCM", "UCUM"}
    groups = [g for item in sr.ContentSequence if item.ValueType == "CONTAINER" for g in item.ContentSequence]
    assert len(groups) == len(engine.labels)
    for group in groups:
        items = {c.ConceptNameCodeSequence[0].CodeMeaning: c for c in group.ContentSequence}
        finding = items["Finding"].ConceptCodeSequence[0]
        assert finding.CodingSchemeDesignator in schemes and finding.CodeMeaning in engine.labels
        unit = items["Probability of finding"].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
        assert "Decision threshold" in items and items["Threshold policy"].TextValue == engine.info.policy
        assert items["Presence of property"].ConceptCodeSequence[0].CodeMeaning in ("Present", "Absent")
    cardio = next(g for g in groups if "Cardiomegaly" in str(g.ContentSequence))
    assert "287272002" in str(cardio.ContentSequence)
    device = [c for c in sr.ContentSequence if c.ValueType == "TEXT" and c.TextValue == engine.info.sha256]
    assert device, "the device observer's serial number is the model file's SHA-256"


def test_spool_is_private_dedupes_and_gives_up_into_failed(tmp_path):
    """An instance seen twice is done once; a destination that never answers: retried, then
    moved to SPOOL/failed/ with the reason."""
    from chestxray.pacs.engine import Engine
    from chestxray.pacs.send import CStoreSender, Node
    from chestxray.pacs.service import Processor, RetryPolicy
    from chestxray.pacs.spool import Spool
    from pacs_fixtures import free_port

    spool = Spool(tmp_path / "spool")
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    sender = CStoreSender(Node("NOBODY", "127.0.0.1", free_port()), timeout=2)
    proc = Processor(Engine(None, backend="onnx"), spool, sender, retry=RetryPolicy(attempts=3, base=0.01))
    dx = make_dx(NIH / "00000398_000.png", size=128)
    data = write_dx(tmp_path / "dx.dcm", dx).read_bytes()
    proc.receive(dx, data)
    proc.receive(dx, data)
    assert spool.counts() == {"received": 1}
    for _ in range(50):
        proc.step()
        if spool.counts().get("failed"):
            break
        time.sleep(0.02)  # the backoff: 0.01 s, then 0.02 s
    assert spool.counts() == {"failed": 1}
    (folder,) = (tmp_path / "spool" / "failed").iterdir()
    assert "gave up after 3 attempts" in (folder / "REASON.txt").read_text()
    assert (folder / "instance.dcm").read_bytes() == data and list((folder / "results").glob("*.dcm"))
    assert proc.metrics.retries._value.get() == 2 and proc.metrics.failed._value.get() == 1
    assert not list((tmp_path / "spool" / "incoming").iterdir())


def test_sr_copies_match_what_highdicom_builds(tmp_path):
    """The factory's later reports (the first one read back with this image's values) equal a
    report highdicom builds from scratch, except creation times; and pass dciodvfy."""
    from chestxray.pacs.engine import Engine
    from chestxray.pacs.results import SrFactory, build_sr

    engine = Engine(None, backend="onnx")
    first = make_dx(NIH / "00000398_000.png", size=128)
    second = make_dx(NIH / "00000506_013.png", size=128)
    second.PatientAge, second.StudyDescription = "061Y", "CHEST PA"  # attributes the first lacks
    preds = list(
        engine.analyse([write_dx(tmp_path / f"{i}.dcm", ds) for i, ds in enumerate((first, second))], ["a", "b"])
    )
    preds[1].warnings = ["a test warning"]
    factory = SrFactory(engine.info)
    factory.build(first, preds[0])
    copied, fresh = factory.build(second, preds[1]), build_sr(second, preds[1], engine.info)
    skip = {
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "ContributingEquipmentSequence",
    }
    assert {e.keyword for e in copied} == {e.keyword for e in fresh}
    for element in fresh:
        if element.keyword not in skip:
            assert copied[element.tag] == element, element.keyword
    assert read_sr_findings(copied) == read_sr_findings(fresh)
    copied.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []


def test_sr_bytes_from_the_template_equal_pydicoms(tmp_path):
    """The byte template (pacs/encode.py) gives the same report as highdicom + pydicom, for
    images with other UIDs, other patient and study attributes, and warnings."""
    import io

    from chestxray.pacs.engine import Engine
    from chestxray.pacs.results import SrFactory, build_sr

    engine = Engine(None, backend="onnx")
    dss = [make_dx(p, size=96) for p in sorted(NIH.glob("*.png"))[:4]]
    dss[2].PatientAge, dss[3].StudyDescription = "061Y", "CHEST PA"
    dss[1].PatientName, dss[1].PatientBirthDate = "OTHER^NAME^X", "19991231"
    preds = list(engine.analyse([write_dx(tmp_path / f"{i}.dcm", d) for i, d in enumerate(dss)], list("abcd")))
    preds[3].warnings = ["a test warning", "another one"]
    factory = SrFactory(engine.info)
    factory.warm()  # the template, from a stand-in source (as the listener does at start-up)
    skip = {
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "ContributingEquipmentSequence",
    }
    for ds, pred in zip(dss, preds):
        data = factory.encode(ds, pred)
        assert factory._encoder is not None and factory._encoder.usable  # the fast path ran
        fast = pydicom.dcmread(io.BytesIO(data))
        fresh = build_sr(ds, pred, engine.info)
        assert {e.keyword for e in fast} == {e.keyword for e in fresh}
        for element in fresh:
            if element.keyword not in skip:
                assert fast[element.tag] == element, element.keyword
        assert fast.file_meta.MediaStorageSOPInstanceUID == fresh.SOPInstanceUID
        assert read_sr_findings(fast) == read_sr_findings(fresh)
    (tmp_path / "sr.dcm").write_bytes(data)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []


def test_both_ends_of_an_association_turn_nagles_algorithm_off(tmp_path, monkeypatch):
    """The listener's accepted socket and the sender's socket carry TCP_NODELAY: with Nagle's
    algorithm on, each DIMSE message waits ~40 ms for a delayed ACK from a DCMTK peer."""
    import socket
    from typing import Any, cast

    from chestxray.pacs import listener as listener_module
    from chestxray.pacs import send
    from chestxray.pacs.listener import Listener
    from chestxray.pacs.metrics import PacsMetrics
    from chestxray.pacs.send import CStoreSender, Node

    seen: list[tuple[bool, int]] = []
    turn_off = send.no_delay

    def spy(event: Any) -> None:
        turn_off(event)
        sock = event.assoc.dul.socket.socket
        seen.append((bool(event.assoc.is_requestor), sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))

    class Inbox:
        metrics = PacsMetrics()

        def __init__(self) -> None:
            self.received: list[str] = []

        def receive(self, ds: Any, encoded: bytes) -> None:
            self.received.append(str(ds.SOPInstanceUID))

    monkeypatch.setattr(send, "no_delay", spy)
    monkeypatch.setattr(listener_module, "no_delay", spy)
    inbox = Inbox()
    scp = Listener(cast(Any, inbox), port=0)
    scp.start()
    dx = make_dx(NIH / "00000398_000.png", size=64)
    try:
        CStoreSender(Node("CHESTXRAY", "127.0.0.1", scp.port)).send([write_dx(tmp_path / "dx.dcm", dx)])
    finally:
        scp.stop()
    assert inbox.received == [str(dx.SOPInstanceUID)]
    assert sorted({requestor for requestor, _ in seen}) == [False, True]  # the listener's end and the sender's
    assert all(flag != 0 for _, flag in seen), seen
