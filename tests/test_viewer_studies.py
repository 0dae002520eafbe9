"""The viewer against a real PACS (Orthanc, tests/pacs_fixtures.py): the DICOMweb study source
(QIDO-RS list, WADO-RS image, SR by STOW-RS), the Studies page in real Chromium, `chestxray serve
--dicomweb` keeping patient names off the page and out of the logs, and the DICOM SR download.

Set CHESTXRAY_VIEWER_DOCS=docs to save the Studies page screenshot.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pacs_fixtures import SR_CLASS, make_dx, read_sr_findings, wait_for, write_dx

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "00013125_000.png"
CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
NAME = "Quuxley^Marguerite"  # a test patient; must never reach a log line


def study(tmp: Path, orthanc, date: str, accession: str, **kw) -> object:
    ds = make_dx(EXAMPLE, size=96, **kw)
    ds.StudyDate, ds.AccessionNumber, ds.PatientName = date, accession, NAME
    ds.StudyDescription = f"CHEST {accession}"
    orthanc.upload(write_dx(tmp / f"{accession}.dcm", ds))
    return ds


def source(orthanc, tiny_bundle, **kw):
    from chestxray.inference.predict import Analyzer
    from chestxray.pacs.engine import model_info
    from chestxray.pacs.studies import DicomwebStudies

    analyzer = Analyzer.load(tiny_bundle)
    return analyzer, DicomwebStudies(orthanc.dicomweb, model_info(analyzer, tiny_bundle, "torch"), **kw)


def screenshot(page, selector: str, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)
    png = page.locator(selector).screenshot()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256).save(path, optimize=True)


def sr_findings_in(orthanc, study_uid: str) -> dict[str, tuple[float, bool]]:
    import pydicom

    srs = [i for i in orthanc.instances_of_study(study_uid) if orthanc.tag(i["ID"], "0008,0016") == SR_CLASS]
    assert len(srs) == 1
    return read_sr_findings(pydicom.dcmread(io.BytesIO(orthanc.file(srs[0]["ID"]))))


@pytest.mark.slow
def test_dicomweb_source_lists_pages_fetches_and_sends(orthanc, tiny_bundle, tmp_path):
    from fastapi.testclient import TestClient

    from chestxray.serve.app import create_app

    dx = study(tmp_path, orthanc, "20250103", "ACC1")
    cr = study(tmp_path, orthanc, "20250105", "ACC2", modality="CR", sop_class=CR_CLASS)
    study(tmp_path, orthanc, "20250104", "ACC3", modality="CT", sop_class=CT_CLASS)  # not a radiograph
    lateral = make_dx(EXAMPLE, size=96, study_uid=dx.StudyInstanceUID, view="LL")  # same study, listed first
    lateral.SeriesInstanceUID, lateral.InstanceNumber = dx.SeriesInstanceUID, 0
    orthanc.upload(write_dx(tmp_path / "lateral.dcm", lateral))
    analyzer, pacs = source(orthanc, tiny_bundle)
    app = create_app(analyzer, studies=pacs, model_file=tiny_bundle)
    with TestClient(app) as c:
        first = c.get("/api/v1/studies", params={"limit": 1}).json()
        assert [s["accession"] for s in first["studies"]] == ["ACC2"] and first["more"]  # newest first
        rows = c.get("/api/v1/studies").json()["studies"]
        assert [s["accession"] for s in rows] == ["ACC2", "ACC1"]  # the CT study is not listed
        assert rows[1]["images"] == 2 and rows[1]["description"] == "CHEST ACC1" and not rows[1]["has_result"]
        assert all(s["patient_name"] is None for s in rows)
        assert [s["accession"] for s in c.get("/api/v1/studies", params={"date_to": "20250104"}).json()["studies"]] == [
            "ACC1"
        ]
        assert [s["study_uid"] for s in c.get("/api/v1/studies", params={"accession": "ACC2"}).json()["studies"]] == [
            cr.StudyInstanceUID
        ]

        image = c.get(f"/api/v1/studies/{dx.StudyInstanceUID}/image")
        assert image.status_code == 200 and image.headers["x-sop-uid"] == dx.SOPInstanceUID  # the frontal view
        analysis = c.post("/api/v1/analyses", files={"file": ("x", image.content)}).json()
        params = {"analysis": analysis["id"], "series": dx.SeriesInstanceUID, "sop": dx.SOPInstanceUID}
        sent = c.post(f"/api/v1/studies/{dx.StudyInstanceUID}/results", params=params)
        assert sent.status_code == 200, sent.text
        found = sr_findings_in(orthanc, dx.StudyInstanceUID)
        assert {f["finding"]: round(f["probability"], 6) for f in analysis["prediction"]["findings"]} == {
            k: pytest.approx(v[0], abs=1e-6) for k, v in found.items()
        }
        again = c.post(f"/api/v1/studies/{dx.StudyInstanceUID}/results", params=params)
        assert again.json() == sent.json()  # the same SR UID: the PACS replaces it, no second copy
        assert len(orthanc.sop_classes_in_study(dx.StudyInstanceUID)) == 3
        rows = c.get("/api/v1/studies").json()["studies"]
        assert [s["has_result"] for s in rows] == [False, True]
        assert rows[1]["images"] == 2  # the SR is not counted as an image

        # The image named must be in the study; a study without a radiograph has none to show.
        wrong = c.post(f"/api/v1/studies/{cr.StudyInstanceUID}/results", params=params)
        assert wrong.status_code == 502 and NAME not in wrong.text
        ct = c.get("/api/v1/studies", params={"date_from": "20250104", "date_to": "20250104"}).json()
        assert ct["studies"] == []


@pytest.mark.browser
@pytest.mark.slow
def test_studies_page_on_orthanc_opens_analyses_and_sends_the_sr(orthanc, tiny_bundle, tmp_path):
    from playwright.sync_api import sync_playwright

    from browser_helpers import CHROMIUM, CHROMIUM_ARGS, page_with_errors, serve_in_thread
    from chestxray.serve.app import create_app

    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    dx = study(tmp_path, orthanc, "20251105", "ACC42")
    study(tmp_path, orthanc, "20251101", "ACC41")
    analyzer, pacs = source(orthanc, tiny_bundle, patient_names=True)
    app = create_app(analyzer, studies=pacs, model_file=tiny_bundle, show_patient_names=True)
    with serve_in_thread(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page, problems = page_with_errors(browser, viewport={"width": 1400, "height": 1000})
            page.goto(url + "/")
            rows = page.locator("#study-rows tr")
            rows.first.wait_for()
            assert rows.count() == 2
            first = rows.first.inner_text()
            assert "ACC42" in first and "2025-11-05" in first and "none yet" in first and "Quuxley, Marguerite" in first
            assert page.locator("#studies th.patient").is_visible()
            page.get_by_role("button", name="Open the study of 2025-11-05, accession ACC42").click()
            page.wait_for_function("() => document.querySelector('#status').textContent === 'Analysis done (DICOM).'")
            assert page.locator("#dl-sr").is_visible()  # a DICOM input: its SR can be downloaded
            page.get_by_role("button", name="Send results to PACS").click()
            page.wait_for_function(
                "() => document.querySelector('#status').textContent.startsWith('The results were stored')"
            )
            assert SR_CLASS in orthanc.sop_classes_in_study(dx.StudyInstanceUID)
            findings = page.locator("#findings li").count()
            assert len(sr_findings_in(orthanc, dx.StudyInstanceUID)) == findings == 14
            page.wait_for_function("() => document.querySelector('#study-rows tr').textContent.includes('in the PACS')")
            assert "none yet" in rows.nth(1).inner_text()
            if os.environ.get("CHESTXRAY_VIEWER_DOCS"):  # the picture in docs/viewer.md
                screenshot(page, "#studies", Path(os.environ["CHESTXRAY_VIEWER_DOCS"]) / "viewer-studies.png")
            assert problems == []
        finally:
            browser.close()
    # The same PACS without --show-patient-names: no Patient column, no name anywhere on the page.
    analyzer, pacs = source(orthanc, tiny_bundle)
    with serve_in_thread(create_app(analyzer, studies=pacs)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.locator("#study-rows tr").first.wait_for()
            assert "ACC42" in page.locator("#study-rows").inner_text()
            assert page.locator("#studies th.patient").is_hidden()
            assert "Quuxley" not in page.content()
        finally:
            browser.close()


@pytest.mark.slow
def test_serve_dicomweb_hides_names_and_logs_neither_names_nor_credentials(tiny_bundle, tmp_path):
    import requests

    from pacs_fixtures import orthanc_missing, start_orthanc, stop_orthanc

    if orthanc_missing():
        pytest.skip(orthanc_missing())
    password = "pw-7f3a9c-secret"
    orthanc = start_orthanc(tmp_path / "orthanc", users={"reader": password})
    log = tmp_path / "serve.log"
    src = Path(__file__).resolve().parents[1] / "src"
    env = {
        **os.environ,
        "PACS_AUTH": f"reader:{password}",
        "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, "-m", "chestxray.cli", "serve", "--model", str(tiny_bundle), "--port", "0"]
    cmd += ["--dicomweb", orthanc.dicomweb, "--auth-env", "PACS_AUTH", "--access-log"]
    proc = None
    try:
        dx = study(tmp_path, orthanc, "20250103", "ACC9")
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        port = wait_for(lambda: re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text()), timeout=90)
        assert port, log.read_text()
        url = f"http://127.0.0.1:{port.group(1)}"
        assert wait_for(lambda: b"Uvicorn running" in log.read_bytes() or _up(url), timeout=30)
        listed = requests.get(url + "/api/v1/studies", timeout=30)
        assert listed.status_code == 200 and listed.json()["studies"][0]["accession"] == "ACC9"
        assert listed.json()["studies"][0]["patient_name"] is None and "Quuxley" not in listed.text
        image = requests.get(f"{url}/api/v1/studies/{dx.StudyInstanceUID}/image", timeout=30)
        analysis = requests.post(url + "/api/v1/analyses", files={"file": ("x", image.content)}, timeout=60).json()
        params = {"analysis": analysis["id"], "series": dx.SeriesInstanceUID, "sop": dx.SOPInstanceUID}
        sent = requests.post(f"{url}/api/v1/studies/{dx.StudyInstanceUID}/results", params=params, timeout=60)
        assert sent.status_code == 200, sent.text
        assert SR_CLASS in orthanc.sop_classes_in_study(dx.StudyInstanceUID)
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        stop_orthanc(orthanc)
    text = log.read_text()
    assert '"route":"/api/v1/studies/{study_uid}/results","status":200' in text  # the access log was on
    for secret in ("Quuxley", "Marguerite", password, dx.PatientID, dx.StudyInstanceUID):
        assert secret not in text, secret


def _up(url: str) -> bool:
    import requests

    try:
        return requests.get(url + "/healthz", timeout=2).ok
    except requests.RequestException:
        return False


def test_sr_download_has_the_analysis_findings_and_only_what_it_needs_of_the_header(tiny_bundle, tmp_path):
    import pydicom
    from fastapi.testclient import TestClient

    from chestxray.inference.predict import Analyzer
    from chestxray.serve.app import create_app
    from chestxray.serve.viewer_routes import SR_SOURCE

    ds = make_dx(EXAMPLE, size=96)
    ds.PatientName = NAME
    data = write_dx(tmp_path / "dx.dcm", ds).read_bytes()
    analyzer = Analyzer.load(tiny_bundle)
    app = create_app(analyzer, model_file=tiny_bundle)
    with TestClient(app) as c:
        analysis = c.post("/api/v1/analyses", files={"file": ("x", data)}).json()
        display = c.get(f"/api/v1/analyses/{analysis['id']}/display").json()
        assert display["sr_url"] == f"/api/v1/analyses/{analysis['id']}/sr.dcm"
        resp = c.get(display["sr_url"])
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/dicom"
        assert "chestxray-sr.dcm" in resp.headers["content-disposition"]
        sr = pydicom.dcmread(io.BytesIO(resp.content))
        assert sr.SOPClassUID == SR_CLASS and sr.StudyInstanceUID == ds.StudyInstanceUID
        assert str(sr.PatientName) == NAME and sr.AccessionNumber == ds.AccessionNumber
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        found = read_sr_findings(sr)
        expected = {f["finding"]: (f["probability"], f["positive"]) for f in analysis["prediction"]["findings"]}
        assert found.keys() == expected.keys() and len(found) == 14
        for name, (p, positive) in expected.items():
            assert found[name][0] == pytest.approx(p, abs=1e-6) and found[name][1] == positive

        kept = app.state.store.get(analysis["id"]).viewer[SR_SOURCE]
        assert "PixelData" not in kept and "Rows" not in kept and "ViewPosition" not in kept
        assert kept.PatientName == NAME  # in memory only, with the analysis

        png = c.post("/api/v1/analyses", files={"file": ("x", EXAMPLE.read_bytes())}).json()
        assert c.get(f"/api/v1/analyses/{png['id']}/display").json()["sr_url"] is None
        refused = c.get(f"/api/v1/analyses/{png['id']}/sr.dcm")
        assert refused.status_code == 422 and "DICOM inputs" in refused.json()["detail"]
        assert c.get("/api/v1/analyses/nope/sr.dcm").status_code == 404

    import chestxray.serve.viewer_routes as viewer_routes

    with pytest.MonkeyPatch.context() as mp:  # an install without the pacs extra
        mp.setattr(viewer_routes.importlib.util, "find_spec", lambda name: None)
        without = create_app(analyzer, model_file=tiny_bundle)
    with TestClient(without) as c:
        analysis = c.post("/api/v1/analyses", files={"file": ("x", data)}).json()
        assert c.get(f"/api/v1/analyses/{analysis['id']}/display").json()["sr_url"] is None
        refused = c.get(f"/api/v1/analyses/{analysis['id']}/sr.dcm")
        assert refused.status_code == 501 and "pacs extra" in refused.json()["detail"]
    bare = create_app(analyzer)
    with TestClient(bare) as c:  # no model file (or no pacs extra): no SR, no button, no header kept
        analysis = c.post("/api/v1/analyses", files={"file": ("x", data)}).json()
        assert c.get(f"/api/v1/analyses/{analysis['id']}/display").json()["sr_url"] is None
        assert c.get(f"/api/v1/analyses/{analysis['id']}/sr.dcm").status_code == 501
        assert bare.state.store.get(analysis["id"]).viewer[SR_SOURCE] is None


def test_serve_dicomweb_option_errors_are_one_line_and_echo_no_secret(capsys, monkeypatch):
    from chestxray.cli import main

    monkeypatch.delenv("PACS_AUTH_UNSET", raising=False)
    cases = [
        (["--show-patient-names"], "go with --dicomweb"),
        (["--dicomweb", "ftp://user:hunter2@pacs/dicom-web"], "expected an http:// or https:// URL"),
        (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--workers", "2"], "needs --workers 1"),
        (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--auth-env", "PACS_AUTH_UNSET"], "not set or empty"),
    ]
    for extra, message in cases:
        assert main(["serve", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "hunter2" not in err and "Traceback" not in err
