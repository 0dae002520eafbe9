"""The PACS front end against a real Orthanc: listener, DICOMweb client, spool, results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pacs_fixtures import (
    SR_CLASS,
    c_store,
    make_dx,
    read_sr_findings,
    start_listener,
    wait_for,
    write_dx,
)

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

NIH = Path(__file__).parent / "data" / "nih-mini" / "images"


def predict_json(path: Path, tmp: Path, *extra: str) -> dict:
    from chestxray.cli import main

    out = tmp / f"{path.stem}.json"
    assert main(["predict", str(path), "--format", "json", "--out", str(out), "--no-progress", *extra]) == 0
    return json.loads(out.read_text())[0]


def srs_in_study(orthanc, study_uid: str) -> list[dict]:
    return [i for i in orthanc.instances_of_study(study_uid) if orthanc.tag(i["ID"], "0008,0016") == SR_CLASS]


def test_listener_end_to_end(orthanc, tmp_path):
    """A DX C-STOREd into Orthanc and forwarded to the listener comes back as an SR in the
    same study, with the same findings as `chestxray predict` on the instance."""
    dx = make_dx(NIH / "00000398_000.png")
    path = write_dx(tmp_path / "dx.dcm", dx)
    listener = start_listener(tmp_path, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    try:
        assert c_store("127.0.0.1", orthanc.dicom_port, "ORTHANC", [dx]) == [0]
        orthanc.add_modality("chestxray", "CHESTXRAY", listener.port)
        ids = [i["ID"] for i in orthanc.instances_of_study(dx.StudyInstanceUID)]
        orthanc.store_to("chestxray", ids)
        srs = wait_for(lambda: srs_in_study(orthanc, dx.StudyInstanceUID), timeout=60)
        assert len(srs) == 1, listener.text()
    finally:
        listener.stop()
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(orthanc.dicomweb)
    series = orthanc.get(f"/instances/{srs[0]['ID']}/series")["MainDicomTags"]["SeriesInstanceUID"]
    sop = orthanc.tag(srs[0]["ID"], "0008,0018")
    sr = client.retrieve_instance(dx.StudyInstanceUID, series, sop)
    assert sr.SeriesDescription == "chestxray findings"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.PatientID == dx.PatientID
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99CHESTXRAY"
    found = read_sr_findings(sr)
    expected = predict_json(path, tmp_path, "--backend", "onnx")
    assert set(found) == {f["finding"] for f in expected["findings"]}
    for f in expected["findings"]:
        prob, present = found[f["finding"]]
        assert prob == pytest.approx(f["probability"], abs=1e-4)
        assert present == f["positive"]
    texts = [c.TextValue for c in sr.ContentSequence if c.ValueType == "TEXT"]
    assert "Research use only. Not for clinical use." in texts
    log = listener.text()
    assert dx.SOPInstanceUID not in log and dx.PatientID not in log
