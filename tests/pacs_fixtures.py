"""PACS test helpers and fixtures (shared through conftest.py): DX instances made from real
NIH radiographs, and a real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) started as a
plain process on free loopback ports with a temporary configuration."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import polling

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7")
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def make_dx(
    png: Path,
    *,
    study_uid: str | None = None,
    view: str = "PA",
    body_part: str = "CHEST",
    sop_class: str = DX_PRESENTATION,
    modality: str = "DX",
    size: int | None = None,
    patient_id: str | None = None,
):
    """A DX For Presentation instance (8-bit MONOCHROME2) of a real radiograph, with the
    patient and study modules filled in (test values, no real patient)."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    img = Image.open(png).convert("L")
    if size:
        img = img.resize((size, size))
    pixels = np.asarray(img, dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "TEST^PACS"
    ds.PatientID = patient_id or "TEST-" + png.stem
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime = "20250101", "120000"
    ds.SeriesDate, ds.SeriesTime = "20250101", "120000"
    ds.ContentDate, ds.ContentTime = "20250101", "120000"
    ds.AccessionNumber = "A" + png.stem[:15]
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "test"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.ImagerPixelSpacing = [0.143, 0.143]
    ds.ImageLaterality = "U"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.DetectorType = "DIRECT"
    ds.PositionerType = ""
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "51185008", "SCT", "Chest"
    ds.AnatomicRegionSequence = [region]
    ds.PixelData = pixels.tobytes()
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def write_dx(path: Path, ds) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dicomweb_plugin() -> str | None:
    return next((p for p in DICOMWEB_PLUGINS if os.path.exists(p)), None)


@dataclass
class Orthanc:
    """A running Orthanc: REST at `url`, DICOMweb at `url + /dicom-web`, DIMSE at `aet@127.0.0.1:dicom_port`."""

    url: str
    dicom_port: int
    aet: str
    proc: subprocess.Popen
    storage: Path
    users: dict[str, str] | None = None

    @property
    def auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items())) if self.users else None

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def get(self, path: str):
        import requests  # with dicomweb-client (the pacs extra): not needed by the other tests

        r = requests.get(self.url + path, timeout=10, auth=self.auth)
        r.raise_for_status()
        return r.json()

    def call(self, method: str, path: str, body: object = None, raw: bytes | None = None):
        import requests

        r = requests.request(
            method, self.url + path, data=raw, json=body if raw is None else None, timeout=60, auth=self.auth
        )
        r.raise_for_status()
        return r.json() if r.content else None

    def upload(self, path: Path) -> str:
        return self.call("POST", "/instances", raw=path.read_bytes())["ID"]

    def add_modality(self, name: str, aet: str, port: int) -> None:
        self.call("PUT", f"/modalities/{name}", {"AET": aet, "Host": "127.0.0.1", "Port": port})

    def store_to(self, modality: str, orthanc_ids: list[str]) -> dict:
        return self.call("POST", f"/modalities/{modality}/store", {"Resources": orthanc_ids, "Synchronous": True})

    def instances_of_study(self, study_uid: str) -> list[dict]:
        found = self.call("POST", "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        return [i for study in found for i in self.get(f"/studies/{study}/instances?expand")]

    def sop_classes_in_study(self, study_uid: str) -> list[str]:
        return [self.tag(i["ID"], "0008,0016") for i in self.instances_of_study(study_uid)]

    def tag(self, instance_id: str, tag: str) -> str:
        import requests

        r = requests.get(f"{self.url}/instances/{instance_id}/content/{tag}", timeout=10, auth=self.auth)
        r.raise_for_status()
        return r.content.decode().strip("\x00 ")

    def file(self, instance_id: str) -> bytes:
        import requests

        r = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=30, auth=self.auth)
        r.raise_for_status()
        return r.content

    def all_instances(self) -> list[str]:
        return self.get("/instances")


def start_orthanc(tmp: Path, dicom_port: int | None = None, users: dict[str, str] | None = None) -> Orthanc:
    plugin = dicomweb_plugin()
    http, dicom = free_port(), dicom_port or free_port()
    storage = tmp / "orthanc-db"
    tmp.mkdir(parents=True, exist_ok=True)
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "chestxray-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomAssociationCloseDelay": 0,
        "StorageCompression": False,
        "SyncStorageArea": False,  # a temporary folder: no fsync per stored file
        "HttpsVerifyPeers": False,
        "SaveJobs": False,
        "LimitJobs": 0,
        "DicomScuTimeout": 20,
        "ConcurrentJobs": 2,
    }
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = open(tmp / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    # Debian's Orthanc links the system DCMTK, built with Nagle's algorithm on (Orthanc's own
    # builds turn it off): every DIMSE message then waits ~40 ms for a delayed ACK. TCP_NODELAY
    # is DCMTK's run-time switch for it, as docs/pacs.md tells users of that package.
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env)
    url = f"http://127.0.0.1:{http}"
    orthanc = Orthanc(url, dicom, "ORTHANC", proc, storage, users)
    deadline = time.monotonic() + 20
    while True:
        try:
            orthanc.get("/system")
            return orthanc
        except OSError:  # requests' ConnectionError is an OSError
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_orthanc(orthanc)
                raise RuntimeError(f"Orthanc did not start: see {tmp / 'orthanc.log'}") from None
            time.sleep(0.05)


def stop_orthanc(orthanc: Orthanc) -> None:
    if orthanc.proc.poll() is None:
        os.kill(orthanc.proc.pid, signal.SIGTERM)
        try:  # Orthanc takes seconds to close its HTTP threads; its storage is a temporary folder
            orthanc.proc.wait(1)
        except subprocess.TimeoutExpired:
            os.kill(orthanc.proc.pid, signal.SIGKILL)
            orthanc.proc.wait()


def orthanc_missing() -> str | None:
    if not os.path.exists(ORTHANC):
        return "Orthanc is not installed (Debian package orthanc; `make services` installs it)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb; `make services`)"
    return None


@pytest.fixture
def orthanc(tmp_path) -> Iterator[Orthanc]:
    """A fresh Orthanc for one test, stopped by PID afterwards."""
    reason = orthanc_missing()
    if reason:
        pytest.skip(reason)
    server = start_orthanc(tmp_path / "orthanc")
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            stop_orthanc(server)


SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture


def c_store(host: str, port: int, called_ae: str, datasets, calling_ae: str = "TESTSCU", tls=None) -> list[int]:
    """C-STORE `datasets` (pydicom Datasets) to a node (over TLS with an ssl.SSLContext); the status of each."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=(tls, None) if tls is not None else None)
    if not assoc.is_established:
        return []
    try:
        return [int(getattr(assoc.send_c_store(ds), "Status", -1)) for ds in datasets]
    finally:
        assoc.release()


@dataclass
class ListenerProc:
    proc: subprocess.Popen
    port: int
    log: Path
    spool: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()


def start_listener(
    tmp: Path,
    *args: str,
    port: int | None = None,
    spool: Path | None = None,
    entry: tuple[str, ...] = ("-m", "chestxray.cli"),
) -> ListenerProc:
    """`chestxray listen` as a process (ONNX backend unless told), ready when it logs that it
    listens. `entry`: how Python starts the CLI (a benchmark passes `-c` code)."""
    import sys

    port = port or free_port()
    spool = spool or tmp / "spool"
    log = tmp / f"listener-{time.monotonic_ns()}.log"
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, *entry, "listen", "--port", str(port), "--spool", str(spool), *args]
    if "--backend" not in args:
        cmd += ["--backend", "onnx"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    lp = ListenerProc(proc, port, log, spool)
    deadline = time.monotonic() + 60
    while "listening as" not in lp.text():
        if proc.poll() is not None or time.monotonic() > deadline:
            lp.stop()
            raise RuntimeError("listener did not start:\n" + lp.text()[-2000:])
        time.sleep(0.05)
    return lp


# Orthanc and the listener are polled over the network: every 0.1 s, not the default 5 ms.
wait_for = functools.partial(polling.wait_for, step=0.1)


def read_sr_findings(sr) -> dict[str, tuple[float, bool]]:
    """finding name -> (probability, present) from a TID 1500 SR read back with pydicom."""
    out: dict[str, tuple[float, bool]] = {}
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeMeaning != "Imaging Measurements":
            continue
        for group in item.ContentSequence:
            finding = prob = present = None
            for c in group.ContentSequence:
                meaning = c.ConceptNameCodeSequence[0].CodeMeaning
                if meaning == "Finding":
                    finding = c.ConceptCodeSequence[0].CodeMeaning
                elif meaning == "Probability of finding":
                    prob = float(c.MeasuredValueSequence[0].NumericValue)
                elif meaning == "Presence of property":
                    present = c.ConceptCodeSequence[0].CodeMeaning == "Present"
            assert finding is not None and prob is not None and present is not None
            out[finding] = (prob, present)
    return out
