"""The PACS front end against a real Orthanc: listener, DICOMweb client, spool, results."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_fixtures import (
    SC_CLASS,
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


@pytest.mark.slow  # a real Orthanc and listener: `make test`, not the edit loop
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
    assert not list((listener.spool / "incoming").iterdir())  # deleted once the results were sent


def metric(port: int, name: str, label: str = "") -> float:
    import requests

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_total") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow  # a real Orthanc and listener: `make test`, not the edit loop
def test_listener_skips_what_it_cannot_read_and_keeps_going(orthanc, tmp_path):
    """A lateral view, a CT-class instance and a corrupt one get no SR and a logged reason
    (and a counter); the listener answers the next good instance."""
    from pacs_fixtures import CT_IMAGE, free_port

    lateral = make_dx(NIH / "00000506_013.png", view="LL", size=128)
    ct = make_dx(NIH / "00000506_013.png", sop_class=CT_IMAGE, modality="CT", size=128)
    corrupt = make_dx(NIH / "00000506_013.png", size=128)
    corrupt.PixelData = b"\x00" * 100  # far fewer bytes than Rows x Columns
    good = make_dx(NIH / "00000398_000.png", size=128)
    mport = free_port()
    listener = start_listener(
        tmp_path, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--metrics-port", str(mport)
    )
    try:
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [lateral, ct, corrupt]) == [0, 0, 0]
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [good]) == [0]
        assert wait_for(lambda: srs_in_study(orthanc, good.StudyInstanceUID), timeout=60), listener.text()
        assert listener.proc.poll() is None
        for ds in (lateral, ct, corrupt):
            assert not srs_in_study(orthanc, ds.StudyInstanceUID)
        log = listener.text()
        assert "not a frontal view (ViewPosition LL)" in log
        assert "not a CR/DX radiograph (SOP class CT Image Storage)" in log
        assert log.count("skipped ") == 3, log
        assert metric(mport, "chestxray_pacs_skipped", 'reason="view"') == 1
        assert metric(mport, "chestxray_pacs_skipped", 'reason="sop_class"') == 1
        assert metric(mport, "chestxray_pacs_skipped", 'reason="unreadable"') == 1
        assert metric(mport, "chestxray_pacs_received") == 4
        assert wait_for(lambda: metric(mport, "chestxray_pacs_sent") == 1, timeout=10)  # counted after the send
    finally:
        listener.stop()


@pytest.mark.slow  # a real Orthanc and listener: `make test`, not the edit loop
def test_listener_refuses_unknown_ae_titles(orthanc, tmp_path):
    dx = make_dx(NIH / "00000398_000.png", size=128)
    listener = start_listener(
        tmp_path,
        "--send-to",
        f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        "--allow",
        "GOODSCU,ORTHANC@127.0.0.1,REMOTE@10.9.9.9",
    )
    try:
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [dx], calling_ae="STRANGER") == []
        # A known title from another host than its entry names is refused too.
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [dx], calling_ae="REMOTE") == []
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [dx], calling_ae="GOODSCU") == [0]
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [dx], calling_ae="ORTHANC") == [0]
    finally:
        listener.stop()


@pytest.mark.slow
def test_listener_delivers_after_the_destination_comes_back(tmp_path):
    """Results wait in the spool while the destination is down, and arrive once it is up."""
    from pacs_fixtures import free_port, orthanc_missing, start_orthanc, stop_orthanc

    if orthanc_missing():
        pytest.skip(orthanc_missing())
    port = free_port()
    dx = make_dx(NIH / "00000398_000.png", size=128)
    listener = start_listener(tmp_path, "--send-to", f"ORTHANC@127.0.0.1:{port}", "--retry-delay", "0.5")
    server = None
    try:
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [dx]) == [0]
        assert wait_for(lambda: "retry 2" in listener.text(), timeout=30), listener.text()
        server = start_orthanc(tmp_path / "late-orthanc", dicom_port=port)
        assert wait_for(lambda: srs_in_study(server, dx.StudyInstanceUID), timeout=60), listener.text()
        assert wait_for(lambda: "sent 1 result object(s)" in listener.text(), timeout=10)
    finally:
        listener.stop()
        if server is not None:
            stop_orthanc(server)


@pytest.mark.slow
def test_kill_9_and_restart_answers_each_instance_once(orthanc, tmp_path):
    """kill -9 in the middle of 20 instances, a restart, and the PACS sending all 20 again:
    each study has exactly one SR."""
    images = sorted(NIH.glob("*.png"))[:20]
    instances = [make_dx(p, size=128) for p in images]
    assert c_store("127.0.0.1", orthanc.dicom_port, "ORTHANC", instances) == [0] * 20
    ids = [orthanc.instances_of_study(ds.StudyInstanceUID)[0]["ID"] for ds in instances]
    spool = tmp_path / "spool"
    # With a decoder process (started once, beside the listener): it must not outlive a kill -9.
    dest = ("--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    listener = start_listener(tmp_path, *dest, "--batch-size", "4", "--workers", "1")
    orthanc.add_modality("chestxray", "CHESTXRAY", listener.port)
    orthanc.call("POST", "/modalities/chestxray/store", {"Resources": ids, "Synchronous": False})

    def count() -> int:
        return sum(bool(srs_in_study(orthanc, ds.StudyInstanceUID)) for ds in instances)

    assert wait_for(lambda: count() >= 2 or "sent" in listener.text(), timeout=60, step=0.02)
    helpers = descendants(listener.proc.pid)
    listener.kill9()
    assert count() < 20
    assert helpers, "no decoder process ran beside the listener"
    assert wait_for(lambda: not any(alive(pid) for pid in helpers), timeout=20), "a decoder outlived the listener"
    listener = start_listener(
        tmp_path, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", port=listener.port, spool=spool
    )
    try:
        orthanc.store_to("chestxray", ids)  # the PACS sends the study again, as after any failed job
        assert wait_for(lambda: count() == 20, timeout=120), listener.text()
        wait_for(lambda: "received" not in (listener.text().rsplit("sent", 1)[-1]), timeout=5)
        for ds in instances:
            assert len(srs_in_study(orthanc, ds.StudyInstanceUID)) == 1
    finally:
        listener.stop()
    assert "already handled, not repeated" in listener.text()


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if not children.exists():
        pytest.skip("needs Linux /proc to follow child processes")
    out = []
    for child in (int(c) for c in children.read_text().split()):
        out += [child, *descendants(child)]
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not reaped it


def dciodvfy_errors(path: Path) -> list[str]:
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools; `make services` installs it)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.slow
def test_listener_with_cam_sends_secondary_captures_that_validate(orthanc, tmp_path):
    """--cam: one RGB Secondary Capture per positive finding, burned-in caption, own series;
    the SR and the SCs pass dciodvfy with no errors."""
    from dicomweb_client.api import DICOMwebClient

    pytest.importorskip("torch")  # Grad-CAM takes gradients: the torch backend

    dx = make_dx(NIH / "00000398_000.png", size=256)
    listener = start_listener(
        tmp_path, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--cam", "--backend", "torch"
    )
    try:
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [dx]) == [0]
        assert wait_for(lambda: srs_in_study(orthanc, dx.StudyInstanceUID), timeout=90), listener.text()
        # The SR and the SCs go in one association: all are there once the SR is.
        wait_for(lambda: "sent" in listener.text(), timeout=10)
    finally:
        listener.stop()
    client = DICOMwebClient(orthanc.dicomweb)
    by_class: dict[str, list] = {}
    for attrs in client.search_for_instances(study_instance_uid=dx.StudyInstanceUID):
        sop_class = attrs["00080016"]["Value"][0]
        ds = client.retrieve_instance(dx.StudyInstanceUID, attrs["0020000E"]["Value"][0], attrs["00080018"]["Value"][0])
        by_class.setdefault(sop_class, []).append(ds)
    (sr,) = by_class[SR_CLASS]
    positives = {name for name, (_, present) in read_sr_findings(sr).items() if present}
    scs = by_class[SC_CLASS]
    assert positives and {sc.ImageComments.split()[1] for sc in scs} == positives
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1
    assert scs[0].SeriesInstanceUID not in (sr.SeriesInstanceUID, dx.SeriesInstanceUID)
    for i, ds in enumerate([sr, *scs]):
        assert ds.StudyInstanceUID == dx.StudyInstanceUID
        path = tmp_path / f"out{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path
    for sc in scs:
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == dx.SOPInstanceUID
        band = sc.pixel_array[:12].astype(int)  # the caption band is dark with white text
        assert band.max() > 200 and np.median(band) < 60


def test_dicomweb_analyses_a_study_once(orthanc, tmp_path):
    """`chestxray dicomweb URL --study UID`: QIDO, WADO, STOW into the same study, the same
    findings as predict; a second run finds this model's SR and does nothing."""
    from chestxray.cli import main

    dx = make_dx(NIH / "00000398_000.png")
    path = write_dx(tmp_path / "dx.dcm", dx)
    lateral = make_dx(
        NIH / "00000506_013.png", study_uid=dx.StudyInstanceUID, patient_id=dx.PatientID, view="LATERAL", size=128
    )
    assert c_store("127.0.0.1", orthanc.dicom_port, "ORTHANC", [dx, lateral]) == [0, 0]
    args = ["dicomweb", orthanc.dicomweb, "--study", dx.StudyInstanceUID, "--backend", "onnx"]
    assert main([*args, "--spool", str(tmp_path / "spool")]) == 0
    srs = srs_in_study(orthanc, dx.StudyInstanceUID)
    assert len(srs) == 1
    sr = pydicom.dcmread(io.BytesIO(orthanc.file(srs[0]["ID"])))
    expected = predict_json(path, tmp_path, "--backend", "onnx")
    found = read_sr_findings(sr)
    for f in expected["findings"]:
        assert found[f["finding"]][0] == pytest.approx(f["probability"], abs=1e-4)
        assert found[f["finding"]][1] == f["positive"]
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in ref] == [dx.SOPInstanceUID]  # not the lateral view
    assert main([*args, "--spool", str(tmp_path / "spool2")]) == 0
    assert len(srs_in_study(orthanc, dx.StudyInstanceUID)) == 1


@pytest.mark.slow
def test_sigterm_journals_work_in_flight_for_the_next_start(orthanc, tmp_path):
    """SIGTERM right after a burst: the listener exits cleanly, what it had not finished stays
    journaled, and the next start answers each instance once."""
    instances = [make_dx(p, size=96) for p in sorted(NIH.glob("*.png"))[20:32]]
    spool = tmp_path / "spool"
    dest = ("--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--batch-size", "4")
    listener = start_listener(tmp_path, *dest)
    assert c_store("127.0.0.1", listener.port, "CHESTXRAY", instances) == [0] * 12
    listener.stop()  # SIGTERM
    assert listener.proc.returncode == 0
    assert "instance(s) journaled for the next start" in listener.text()
    restarted = start_listener(tmp_path, *dest, port=listener.port, spool=spool)
    try:
        done = wait_for(lambda: all(srs_in_study(orthanc, ds.StudyInstanceUID) for ds in instances), timeout=60)
        assert done, restarted.text()
        assert all(len(srs_in_study(orthanc, ds.StudyInstanceUID)) == 1 for ds in instances)
    finally:
        restarted.stop()


@pytest.mark.slow  # a real Orthanc and listener: `make test`, not the edit loop
def test_dicomweb_since_dry_run_and_credentials_from_the_environment(tmp_path, monkeypatch, capsys):
    """Against an Orthanc that wants a password: refused without --auth-env (one line, no
    traceback); --dry-run lists and stores nothing; --since finds the study; the password is
    never printed."""
    from chestxray.cli import main
    from pacs_fixtures import orthanc_missing, start_orthanc, stop_orthanc

    if orthanc_missing():
        pytest.skip(orthanc_missing())
    server = start_orthanc(tmp_path / "orthanc", users={"alice": "s3cret-pw"})
    try:
        dx = make_dx(NIH / "00000398_000.png", size=128)
        assert c_store("127.0.0.1", server.dicom_port, "ORTHANC", [dx]) == [0]
        base = ["dicomweb", server.dicomweb, "--since", "20240101", "--backend", "onnx"]
        assert main([*base, "--spool", str(tmp_path / "s0")]) == 2
        err = capsys.readouterr().err
        assert "chestxray dicomweb: error:" in err and "Traceback" not in err
        monkeypatch.setenv("PACS_AUTH", "alice:s3cret-pw")
        assert main([*base, "--auth-env", "PACS_AUTH", "--dry-run"]) == 0
        out, err = capsys.readouterr()
        assert "1 CR/DX instance(s) would be analysed" in out
        assert not srs_in_study(server, dx.StudyInstanceUID)
        assert main(["-v", *base, "--auth-env", "PACS_AUTH", "--spool", str(tmp_path / "s1")]) == 0
        out, err = capsys.readouterr()
        assert len(srs_in_study(server, dx.StudyInstanceUID)) == 1
        assert "s3cret-pw" not in out + err
    finally:
        stop_orthanc(server)


@pytest.mark.slow
def test_dicomweb_watch_picks_up_new_studies_until_sigterm(orthanc, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "chestxray.cli", "dicomweb", orthanc.dicomweb, "--watch", "0.5"]
    cmd += ["--watch-since", "20240101", "--backend", "onnx", "--spool", str(tmp_path / "spool")]
    log = tmp_path / "watch.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        dx = make_dx(NIH / "00000398_000.png", size=128)
        assert c_store("127.0.0.1", orthanc.dicom_port, "ORTHANC", [dx]) == [0]  # a study arrives while it watches
        assert wait_for(lambda: srs_in_study(orthanc, dx.StudyInstanceUID), timeout=60), log.read_text()
        # The next polls find this model's SR and leave the study alone.
        assert wait_for(lambda: "already has this model's SR" in log.read_text(), timeout=30), log.read_text()
        assert len(srs_in_study(orthanc, dx.StudyInstanceUID)) == 1
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.slow  # a real Orthanc and listener: `make test`, not the edit loop
def test_listener_over_tls(orthanc, tmp_path):
    """With --tls-cert/--tls-key the listener speaks TLS only: a TLS caller that trusts the
    certificate stores; a plain one gets no association."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    dx = make_dx(NIH / "00000398_000.png", size=96)
    listener = start_listener(
        tmp_path, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        client.check_hostname = False
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [dx]) == []
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [dx], tls=client) == [0]
        assert wait_for(lambda: srs_in_study(orthanc, dx.StudyInstanceUID), timeout=60), listener.text()
    finally:
        listener.stop()


@pytest.mark.slow  # a real Orthanc and listener: `make test`, not the edit loop
def test_listener_sends_by_stow_rs(orthanc, tmp_path):
    dx = make_dx(NIH / "00000398_000.png", size=96)
    listener = start_listener(tmp_path, "--stow", orthanc.dicomweb)
    try:
        assert c_store("127.0.0.1", listener.port, "CHESTXRAY", [dx]) == [0]
        assert wait_for(lambda: srs_in_study(orthanc, dx.StudyInstanceUID), timeout=60), listener.text()
    finally:
        listener.stop()
    assert f"to {orthanc.dicomweb}" in listener.text()


def test_keep_days_retains_the_spool_until_purged(orthanc, tmp_path):
    from chestxray.pacs.engine import Engine
    from chestxray.pacs.send import CStoreSender, Node
    from chestxray.pacs.service import Processor
    from chestxray.pacs.spool import Spool

    spool = Spool(tmp_path / "spool")
    sender = CStoreSender(Node("ORTHANC", "127.0.0.1", orthanc.dicom_port))
    proc = Processor(Engine(None, backend="onnx"), spool, sender, keep_days=1)
    dx = make_dx(NIH / "00000398_000.png", size=96)
    proc.receive(dx, write_dx(tmp_path / "dx.dcm", dx).read_bytes())
    while proc.step():
        pass
    assert spool.counts() == {"sent": 1} and srs_in_study(orthanc, dx.StudyInstanceUID)
    assert len(list((tmp_path / "spool" / "incoming").iterdir())) == 1  # kept for a day
    assert spool.purge(1) == 0 and spool.purge(0) == 2  # older than 0 days: instance and results go
    assert not list((tmp_path / "spool" / "incoming").iterdir())
