"""`chestxray serve` against hostile clients on a real uvicorn server: DICOM header bombs
must not stall the event loop, slow bodies must not hold compute slots, made-up methods
must not grow /metrics; and the DICOM header warnings quote nothing a file may smuggle in."""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import socket
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from chestxray.serve.app import create_app
from chestxray.serve.runtime import ServeSettings
from polling import wait_for

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

BOUNDARY = "XRAYBOUNDARY"


def header_bomb(elements: int) -> bytes:
    """A Part-10 file (valid file meta) followed by `elements` empty private data elements
    and no pixels: 8 bytes each, so two million take 16 MB, under the default upload limit."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    block = b"".join(struct.pack("<HH2sH", 0x0009, 0x1000 + i, b"LO", 0) for i in range(0xE000))
    return buf.getvalue() + (block * (elements // 0xE000 + 1))[: 8 * elements]


def multipart(data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'.encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(port: int, data: bytes, timeout: float = 60) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST",
            "/api/v1/predict",
            body=multipart(data),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        return conn.getresponse().status
    finally:
        conn.close()


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@contextlib.contextmanager
def running(app) -> Iterator[int]:
    """`app` on uvicorn in a thread; yields its port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started), "the server did not start"
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def analyzer(tiny_bundle):
    from chestxray.inference.predict import Analyzer

    return Analyzer.load(tiny_bundle)


@pytest.fixture(scope="module")
def png(sample_images) -> bytes:
    return sample_images[0].read_bytes()


def test_healthz_stays_fast_while_dicom_header_bombs_are_refused(analyzer, png):
    bomb = header_bomb(2_000_000)
    assert len(bomb) < 20 * 2**20
    app = create_app(analyzer)
    with running(app) as port, ThreadPoolExecutor(3) as pool:
        assert get(port, "/healthz") == 200  # connections and code paths warmed
        bombs = [pool.submit(post, port, bomb) for _ in range(3)]
        times, during = [], 0
        while not all(b.done() for b in bombs):
            t = time.perf_counter()
            assert get(port, "/healthz") == 200
            times.append(round(time.perf_counter() - t, 3))
            during += not all(b.done() for b in bombs)
        assert [b.result() for b in bombs] == [413, 413, 413]  # refused from the bounded header read
        assert during >= 1, "no /healthz was answered while the uploads were in flight"
        print("HEALTHZ_MAX", max(times), len(times), during)
        assert max(times) < 1.0, str(times)  # a loop blocked by a bomb's parse stalls for seconds
        assert post(port, png) == 200
        refusals = app.state.metrics.decode_refusals.labels(reason="decode_limit")._value.get()
        assert refusals == 3


def test_dicom_header_element_cap_is_a_413_with_the_reason(analyzer):
    with TestClient(create_app(analyzer, settings=ServeSettings(max_dicom_elements=1000))) as c:
        r = c.post("/api/v1/predict", files={"file": ("x.dcm", header_bomb(5000), "application/dicom")})
        assert r.status_code == 413 and "more than 1000 data elements" in r.json()["detail"]
        r = c.post("/api/v1/predict", files={"file": ("x.dcm", header_bomb(500), "application/dicom")})
        assert r.status_code == 422  # within the cap: read, and refused as an image without pixels


class SlowBodies:
    """`n` connections that each announce a 10 MB upload, then send one byte every 2 s,
    from their own loopback address (127.0.0.2, .3, ...) unless `address` is given."""

    def __init__(self, port: int, n: int, address: str | None = None) -> None:
        self.socks: list[socket.socket] = []
        for i in range(n):
            s = socket.socket()
            s.bind((address or f"127.0.0.{i + 2}", 0))
            s.connect(("127.0.0.1", port))
            s.sendall(
                b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
                + f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n".encode()
                + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"\r\n\r\n'.encode()
            )
            self.socks.append(s)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.wait(2.0):
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.send(b"\x00")

    def answers(self) -> list[bytes]:
        out = []
        for s in self.socks:
            s.settimeout(0.5)
            try:
                out.append(s.recv(100))
            except OSError:
                out.append(b"")
        return out

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


def test_a_normal_upload_gets_200_while_64_slow_bodies_are_connected(analyzer, png):
    # A long grace, so that the minimum rate does not end the slow bodies during the test.
    app = create_app(analyzer, settings=ServeSettings(receive_grace_s=120))
    rt = app.state.runtime
    with running(app) as port:
        slow = SlowBodies(port, 64)
        try:
            assert wait_for(lambda: rt.receiving.inside == 64), rt.receiving.inside
            assert rt.admission.inside == 0  # receiving holds no compute slot
            assert post(port, png) == 200
            assert rt.receiving.inside == 64  # the slow ones are still connected
        finally:
            slow.close()


def test_bodies_per_client_are_bounded_and_slow_ones_are_cut(analyzer, png):
    settings = ServeSettings(max_receiving_per_client=4, min_receive_rate=1000, receive_grace_s=0.5)
    app = create_app(analyzer, settings=settings)
    rt = app.state.runtime
    with running(app) as port:
        slow = SlowBodies(port, 4, address="127.0.0.1")
        try:
            assert wait_for(lambda: rt.receiving.inside == 4)
            assert post(port, png) == 503  # a fifth body from the same address
            busy = 'chestxray_admission_rejections_total{reason="receiving_full"} 1.0'
            assert busy in rt.metrics.render().decode()
            # under 1000 bytes/s after 0.5 s: each is answered 408 and its place freed
            assert wait_for(lambda: rt.receiving.inside == 0)
            assert all(a.startswith(b"HTTP/1.1 408") for a in slow.answers())
            assert post(port, png) == 200
        finally:
            slow.close()


def test_metrics_label_only_known_methods_and_routes(analyzer):
    with TestClient(create_app(analyzer)) as c:
        before = len(c.get("/metrics").text)
        for i in range(40):
            c.request(f"MADEUP{i}", f"/api/v1/predict{i}")
            c.request(f"BREW{i}", "/healthz")
            c.get(f"/nowhere/{i}")
        text = c.get("/metrics").text
    assert "MADEUP" not in text and "BREW" not in text and "nowhere" not in text
    assert 'method="other",route="other"' in text
    assert len(text) < before + 6000  # a few new series, not 120


# -- the command and the header warnings ----------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-upload-mb", "inf"],
        ["--max-upload-mb", "nan"],
        ["--max-wait-ms", "nan"],
        ["--max-decode-mb=-inf"],
        ["--request-deadline-s", "inf"],
    ],
)
def test_serve_refuses_non_finite_limits_in_one_line(flags, capsys):
    from chestxray.cli import main

    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and flags[0].split("=")[0] in err


def test_dicom_warnings_quote_only_defined_terms_and_keep_pydicom_quiet(tmp_path, caplog):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from chestxray.inference.input_check import dicom_warnings

    def dicom(part: str) -> bytes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        meta.MediaStorageSOPInstanceUID = "1.2.3"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "Doe^Jane_4711"
        ds.PatientName = "Doe^Jane"
        ds.BodyPartExamined = part
        buf = io.BytesIO()
        with caplog.at_level(logging.CRITICAL):
            ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd character set when it is set
        name_inside, knee_file = dicom("DOE JANE"), dicom("KNEE")
    caplog.clear()
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smuggled = dicom_warnings(name_inside, "a.dcm")
        knee = dicom_warnings(knee_file, "b.dcm")
    assert smuggled == ["DICOM BodyPartExamined is an unexpected value, not chest: this model reads chest X-rays only"]
    assert knee and "KNEE" in knee[0]
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [m for m in said if "Doe" in m or "Unknown encoding" in m], said
