"""`chestxray serve` under load and hostile uploads: the decode budget, admission control
(503 + Retry-After), liveness that never waits, timeouts for slow heads and bodies,
dynamic batching equal to one-at-a-time, metrics and access log free of request content."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import struct
import threading
import time
import tracemalloc
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from chestxray.data.images import DecodeLimitError, DecodeLimits, read_image
from chestxray.serve.app import create_app
from chestxray.serve.runtime import ServeSettings
from chestxray.serve.uploads import UploadError, read_file_field
from polling import wait_for

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

SECRET_NAME = "Doe^Jane_1961-04-02.png"


def flat_png(width: int, height: int, color_type: int = 6, bits: int = 16) -> bytes:
    """A valid PNG of one flat colour, written row by row (PIL would need the whole
    decoded image in memory first): a small file that decodes to a huge image."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" + bytes([0x80]) * (width * channels * bits // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def upload(data: bytes, name: str = SECRET_NAME) -> dict:
    return {"files": {"file": (name, data, "image/png")}}


@pytest.fixture(scope="module")
def analyzer(tiny_bundle):
    from chestxray.inference.predict import Analyzer

    return Analyzer.load(tiny_bundle)


@pytest.fixture(scope="module")
def pngs(sample_images) -> list[bytes]:
    return [p.read_bytes() for p in sample_images]


# -- decode budget ---------------------------------------------------------------------


def test_decode_budget_is_judged_from_the_header_by_bytes_not_pixels():
    big = flat_png(3000, 3000)  # 16-bit RGBA: 72 MB decoded, a small file, 9 MP (under the pixel cap)
    assert len(big) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(DecodeLimitError, match=r"3000x3000, 4 channel\(s\) of 16 bit decodes to 69 MiB"):
            read_image(big, name="upload", limits=DecodeLimits(max_bytes=64 * 2**20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # refused from the header: nothing of the 69 MiB decoded
    gray8 = flat_png(3000, 3000, color_type=0, bits=8)  # same pixels, 9 MB: within budget
    assert read_image(gray8, limits=DecodeLimits(max_bytes=64 * 2**20)).shape == (3000, 3000)


def test_reduce_decodes_far_larger_images_at_a_fraction(original_png):
    img = Image.open(original_png).convert("L").resize((2048, 2048))
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        full = read_image(buf.getvalue())
        small = read_image(buf.getvalue(), limits=DecodeLimits(reduce_to=512))
        assert full.shape == (2048, 2048) and small.shape == (512, 512) and small.dtype == np.uint8
        # the same picture, a quarter of the side
        coarse = np.asarray(Image.fromarray(full).resize((512, 512), Image.BOX), dtype=np.float32)
        assert np.abs(coarse - small).mean() < 3.0
    assert read_image(original_png, limits=DecodeLimits(reduce_to=1024)).shape == (1024, 1024)  # not far larger


def test_server_refuses_a_16_bit_rgba_bomb_with_413_and_counts_it(analyzer, pngs):
    settings = ServeSettings(max_decode_bytes=16 * 2**20)
    with TestClient(create_app(analyzer, settings=settings)) as c:
        r = c.post("/api/v1/predict", **upload(flat_png(2000, 2000)))  # 30.5 MiB decoded
        assert r.status_code == 413 and "decode limit" in r.json()["detail"]
        assert c.post("/api/v1/predict", **upload(pngs[0])).status_code == 200
        text = c.get("/metrics").text
        assert 'chestxray_decode_refusals_total{reason="decode_limit"} 1.0' in text


# -- admission, liveness, readiness -------------------------------------------------------


class GatedAnalyzer:
    """The real analyzer, whose `predict` waits until the test opens the gate: inference
    that takes as long as the test needs."""

    def __init__(self, inner) -> None:
        self.inner, self.gate, self.calls, self.held = inner, threading.Event(), [], 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, *args, **kwargs):
        self.held += len(args[0])  # images waiting at the gate
        self.gate.wait(20)
        self.calls.append(len(args[0]))
        return self.inner.predict(*args, **kwargs)


def test_full_queue_is_503_at_once_while_healthz_answers(analyzer, pngs):
    gated = GatedAnalyzer(analyzer)
    settings = ServeSettings(queue_length=3, max_batch=8, max_wait_ms=1, max_upload_bytes=2**20)
    app = create_app(gated, settings=settings)
    with TestClient(app) as c, ThreadPoolExecutor(3) as pool:
        assert c.get("/readyz").json() == {"ready": True, "model_loaded": True, "queue": 0, "queue_length": 3}
        waiting = [pool.submit(c.post, "/api/v1/predict", **upload(d)) for d in pngs[:3]]
        assert wait_for(lambda: app.state.admission.inside == 3)
        busy = c.post("/api/v1/predict", **upload(pngs[3]))
        assert not any(w.done() for w in waiting)  # answered at once, not after the queue moved
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2" and "busy" in busy.json()["detail"]
        # 413 and 415 are still answered first, from the headers
        assert c.post("/api/v1/predict", content=b"x", headers={"content-type": "image/png"}).status_code == 415
        too_big = c.post(
            "/api/v1/predict",
            content=bytes(10),
            headers={"content-type": "multipart/form-data; boundary=B", "content-length": str(4 * 2**20)},
        )
        assert too_big.status_code == 413
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False and ready.json()["queue"] == 3
        for _ in range(20):
            assert c.get("/healthz").status_code == 200
        # Answered while the gate held the queue: none of it reached the model meanwhile.
        assert gated.calls == [] and not any(w.done() for w in waiting)
        gated.gate.set()
        assert [w.result().status_code for w in waiting] == [200, 200, 200]
        assert c.get("/readyz").status_code == 200
        assert 'chestxray_admission_rejections_total{reason="queue_full"} 1.0' in c.get("/metrics").text


def test_request_past_its_deadline_is_503(analyzer, pngs):
    gated = GatedAnalyzer(analyzer)
    with TestClient(create_app(gated, settings=ServeSettings(request_deadline_s=0.3))) as c:
        r = c.post("/api/v1/predict", **upload(pngs[0]))
        assert r.status_code == 503 and "within 0.3 s" in r.json()["detail"] and r.headers["retry-after"]
        gated.gate.set()
        assert c.post("/api/v1/predict", **upload(pngs[0])).status_code == 200


# -- batching ------------------------------------------------------------------------------


def _probs(body: dict) -> dict[str, float]:
    return {f["finding"]: f["probability"] for f in body["findings"]}


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_batched_requests_equal_one_at_a_time(analyzer, pngs, backend):
    if backend == "onnx":  # the packaged int8 default.onnx (exporting the tiny bundle takes ~12 s)
        pytest.importorskip("onnxruntime")
        from chestxray.inference.predict import Analyzer

        analyzer = Analyzer.load(backend="onnx")
    gated = GatedAnalyzer(analyzer)
    app = create_app(gated, settings=ServeSettings(max_batch=8, max_wait_ms=20))
    datas = pngs[:6]
    singles = [analyzer.predict(d, names=["upload"]).to_dict() for d in datas]
    with TestClient(app) as c, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(c.post, "/api/v1/predict", **upload(d)) for d in datas]
        # all six decoded: held at the gate by the first batch, or waiting in the batcher for the next
        assert wait_for(lambda: gated.held + app.state.runtime.batcher.waiting == 6)
        gated.gate.set()
        bodies = [f.result().json() for f in futures]
        metrics = c.get("/metrics").text
    assert max(gated.calls) > 1, gated.calls  # they really ran as a batch
    assert "chestxray_batch_size_count" in metrics
    for got, want in zip(bodies, singles):
        assert [f["finding"] for f in got["findings"]] == [f["finding"] for f in want["findings"]]
        for k, v in _probs(want).items():
            assert _probs(got)[k] == pytest.approx(v, abs=1e-6)


# -- timeouts ------------------------------------------------------------------------------


def test_slow_body_is_408_and_the_partial_upload_is_dropped():
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'

    async def trickle():
        yield head
        for _ in range(100):
            await asyncio.sleep(0.05)
            yield b"\x00" * 300  # 6 KB/s

    t = time.perf_counter()
    with pytest.raises(UploadError) as err:
        asyncio.run(read_file_field("multipart/form-data; boundary=B", None, trickle(), 2**20, timeout_s=0.4))
    assert err.value.status == 408 and err.value.headers == {"Connection": "close"}
    assert time.perf_counter() - t >= 0.35  # not before its time


def test_slow_request_head_is_cut_with_408():
    import uvicorn

    from chestxray.serve.protocol import HeaderTimeoutH11Protocol

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    class Fast(HeaderTimeoutH11Protocol):
        header_timeout_s = 0.4

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, http=Fast, log_level="error", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:  # a whole request works
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(1000).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:  # a slow head does not
            t = time.perf_counter()
            conn.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\n")
            answer = conn.recv(1000)
            assert answer.startswith(b"HTTP/1.1 408") and conn.recv(1000) == b""  # then closed
            assert time.perf_counter() - t >= 0.3  # cut by the timeout, not at once
    finally:
        server.should_exit = True
        thread.join(10)


# -- metrics, logs, echoes -------------------------------------------------------------------


def test_metrics_and_access_log_hold_no_request_content(analyzer, pngs, caplog, monkeypatch):
    access_logger = logging.getLogger("chestxray.serve.access")  # as --access-log sets it up
    monkeypatch.setattr(access_logger, "propagate", True)
    monkeypatch.setattr(access_logger, "level", logging.INFO)
    secret_query = "Patient_Doe_Jane_4711" * 500  # 10,500 characters
    with caplog.at_level(logging.DEBUG), TestClient(create_app(analyzer)) as c:
        ok = c.post("/api/v1/predict", **upload(pngs[0]))
        long_name = c.post("/api/v1/predict", **upload(pngs[0], name="x" * 5000 + ".png"))
        bad = c.post(f"/api/v1/cam?finding={secret_query}", **upload(pngs[0]))
        # a malformed body that makes python-multipart log (it would quote the byte)
        junk = c.post(
            "/api/v1/predict",
            content=b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + b"SECRETBYTES" * 10 + b"\r\n--Bq",
            headers={"content-type": "multipart/form-data; boundary=B"},
        )
        a = c.post("/api/v1/analyses", **upload(pngs[1])).json()
        c.get(f"/api/v1/analyses/{a['id']}/image.png")
        text = c.get("/metrics").text
    assert ok.status_code == 200 and ok.headers["x-request-id"]
    assert long_name.status_code == 200  # an over-long file name is ignored, not "malformed"
    assert bad.status_code == 422 and len(bad.json()["detail"]) < 400 and "\u2026" in bad.json()["detail"]
    assert junk.status_code in (400, 422)
    assert 'chestxray_model_info{backend="torch",model="tiny-test-model"} 1.0' in text
    assert 'chestxray_http_requests_total{method="POST",route="/api/v1/predict",status="200"} 2.0' in text
    assert 'route="/api/v1/analyses/{analysis_id}/image.png"' in text
    assert "chestxray_http_request_duration_seconds_bucket" in text and "chestxray_queue_depth" in text
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "chestxray.serve.access"]
    assert len(access) >= 6 and all(len(x["request_id"]) == 16 and x["ms"] >= 0 for x in access)
    first = next(x for x in access if x["request_id"] == ok.headers["x-request-id"])
    assert (
        first["route"] == "/api/v1/predict" and first["status"] == 200 and {"decode_ms", "inference_ms"} <= set(first)
    )
    # everything the server logged (the test client's own httpx log line has the URL it sent)
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    for secret in ("Doe", "Jane", "4711", "SECRETBYTES", "xxxxxxxxxx", a["id"]):
        assert secret not in text and secret not in logged
    assert not [r for r in caplog.records if r.name.startswith(("python_multipart", "multipart", "PIL", "pydicom"))]


# -- the command ---------------------------------------------------------------------------


def test_serve_workers_get_the_model_settings_and_shared_metrics(tiny_bundle, monkeypatch):
    import os

    from uvicorn.supervisors import Multiprocess

    from chestxray.cli import main
    from chestxray.serve.app import CONFIG_ENV, app_from_env
    from chestxray.serve.protocol import HeaderTimeoutH11Protocol

    seen = {}

    def record_instead_of_forking(self):  # keep the config; start no processes
        seen.update(config=self.config, sockets=self.sockets)

    monkeypatch.setattr(Multiprocess, "run", record_instead_of_forking)
    for name in (CONFIG_ENV, "PROMETHEUS_MULTIPROC_DIR", "CHESTXRAY_HEADER_TIMEOUT_S"):
        monkeypatch.setenv(name, "")  # recorded as unset: what the command sets is removed afterwards
        monkeypatch.delenv(name)
    assert (
        main(
            [
                "serve",
                "--model",
                str(tiny_bundle),
                "--workers",
                "2",
                "--queue-length",
                "7",
                "--port",
                "0",
                "--max-batch",
                "4",
                "--header-timeout-s",
                "3",
            ]
        )
        == 0
    )
    config = seen["config"]
    assert config.app == "chestxray.serve.app:app_from_env" and config.factory is True and config.workers == 2
    assert config.http is HeaderTimeoutH11Protocol and HeaderTimeoutH11Protocol.header_timeout_s == 3.0
    assert len(seen["sockets"]) == 1  # one listening socket, shared by the workers
    assert os.path.isdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])  # multiprocess metrics, a fresh folder
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    app = app_from_env()  # what each worker builds
    assert app.state.settings.queue_length == 7 and app.state.settings.max_batch == 4
    assert app.state.analyzer.name == "tiny-test-model"
    HeaderTimeoutH11Protocol.header_timeout_s = 10.0
    assert main(["serve", "--model", str(tiny_bundle), "--queue-length", "0"]) == 2
