"""REST API of `chestxray serve`: real images through the tiny bundle, every bad input,
the upload limit, Grad-CAM, in-memory analyses, OpenAPI, logs free of names."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.data.images import read_image
from chestxray.labels import FINDINGS
from chestxray.serve import render
from chestxray.serve.app import create_app
from chestxray.serve.runtime import ServeSettings
from chestxray.serve.store import Analysis, ResultStore
from chestxray.serve.uploads import FORM_OVERHEAD, UploadError, read_file_field

with warnings.catch_warnings():  # Starlette warns about its httpx-based client on import
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "00013125_000.png"
SECRET_NAME = "Doe^Jane_1961-04-02.png"  # a client file name that must never come back or be logged


@pytest.fixture(scope="module")
def analyzer(tiny_bundle):
    from chestxray.inference.predict import Analyzer

    return Analyzer.load(tiny_bundle)


@pytest.fixture(scope="module")
def client(analyzer):
    with TestClient(create_app(analyzer, settings=ServeSettings(max_upload_bytes=2 * 2**20))) as c:
        yield c


@pytest.fixture(scope="module")
def png_bytes(sample_images) -> bytes:
    return sample_images[0].read_bytes()


def upload(data: bytes, name: str = SECRET_NAME, ctype: str = "image/png", field: str = "file") -> dict:
    return {"files": {field: (name, data, ctype)}}


def assert_still_serving(client, png: bytes) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.post("/api/v1/predict", **upload(png))
    assert r.status_code == 200 and len(r.json()["findings"]) == len(FINDINGS)


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.load()
    return img


# -- predict -------------------------------------------------------------------------


def test_predict_real_image_same_document_as_predict_json(client, analyzer, png_bytes):
    r = client.post("/api/v1/predict", **upload(png_bytes))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"file", "model", "variant", "findings", "error", "warnings", "threshold_policy"}
    assert body["file"] == "upload" and SECRET_NAME not in r.text
    assert body["model"] == "tiny-test-model" and body["error"] is None
    # The same numbers as the Python API / `predict --format json` for these bytes.
    expected = analyzer.predict(png_bytes, names=["upload"]).to_dict()
    assert [f["finding"] for f in body["findings"]] == [f["finding"] for f in expected["findings"]]
    for got, want in zip(body["findings"], expected["findings"]):
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
        assert got["threshold"] == pytest.approx(want["threshold"])
        assert got["positive"] == (got["probability"] >= got["threshold"])
    assert sorted(f["finding"] for f in body["findings"]) == sorted(FINDINGS)
    assert r.headers["cache-control"] == "no-store"


def test_predict_jpeg_and_1024px_original(client, analyzer):
    gray = read_image(EXAMPLE)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG", quality=92)
    for data, ctype in ((EXAMPLE.read_bytes(), "image/png"), (buf.getvalue(), "image/jpeg")):
        r = client.post("/api/v1/predict", **upload(data, ctype=ctype))
        assert r.status_code == 200, r.text
        want = analyzer.predict(data, names=["upload"])
        assert r.json()["findings"][0]["probability"] == pytest.approx(want.findings[0].probability, abs=1e-6)


def dicom_bytes(gray: np.ndarray, patient: str) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = patient, "ID-4711-SECRET", "DX"
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(gray).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_upload_is_decoded_and_no_tag_leaks(client, sample_images, caplog):
    gray = read_image(sample_images[1])
    data = dicom_bytes(gray, "Doe^Jane")
    with caplog.at_level(logging.DEBUG):
        r = client.post("/api/v1/analyses", **upload(data, name="scan.dcm", ctype="application/dicom"))
        assert r.status_code == 201, r.text
        image = client.get(r.json()["image_url"])
    shown = np.asarray(decode_png(image.content))
    # The browser gets the server's DICOM decoding (range stretched to 8 bit), same pixels.
    np.testing.assert_array_equal(shown, read_image(data))
    assert np.corrcoef(shown.ravel(), gray.ravel())[0, 1] > 0.999
    for secret in ("Doe", "Jane", "ID-4711"):
        assert secret not in r.text and secret not in caplog.text


# -- bad input -----------------------------------------------------------------------


def _truncated_png(original_png: Path) -> bytes:
    data = original_png.read_bytes()
    return data[: len(data) // 3]


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("empty", 400, "empty"),
        ("text", 415, "not a PNG, JPEG or DICOM"),
        ("truncated_png", 422, "cannot read the image"),
        ("png_magic_then_garbage", 422, "cannot read the image"),
        ("wrong_field", 422, "no form field 'file'"),
        ("two_files", 422, "exactly one"),
        ("not_multipart", 415, "multipart/form-data"),
        ("no_boundary", 400, "boundary"),
        ("cut_multipart", 400, "ends before the file does"),
    ],
)
def test_bad_input_is_a_4xx_json_message_and_server_keeps_serving(
    client, png_bytes, original_png, caplog, case, status, message
):
    post = "/api/v1/predict"
    with caplog.at_level(logging.DEBUG):
        if case == "empty":
            r = client.post(post, **upload(b""))
        elif case == "text":
            r = client.post(post, **upload(b"patient notes, not an image\n" * 20, ctype="text/plain"))
        elif case == "truncated_png":
            r = client.post(post, **upload(_truncated_png(original_png)))
        elif case == "png_magic_then_garbage":
            r = client.post(post, **upload(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50))
        elif case == "wrong_field":
            r = client.post(post, **upload(png_bytes, field="image"))
        elif case == "two_files":
            r = client.post(
                post, files=[("file", ("a.png", png_bytes, "image/png")), ("file", ("b.png", png_bytes, "image/png"))]
            )
        elif case == "not_multipart":
            r = client.post(post, content=png_bytes, headers={"content-type": "image/png"})
        elif case == "no_boundary":
            r = client.post(post, content=png_bytes, headers={"content-type": "multipart/form-data"})
        else:  # a multipart body that stops in the middle of the file
            body = (
                b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + png_bytes[:500]
            )
            r = client.post(post, content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["detail"]
    assert SECRET_NAME not in r.text and "Doe^Jane" not in caplog.text
    assert_still_serving(client, png_bytes)


def test_oversized_upload_is_413(analyzer, png_bytes):
    limit = 50_000
    with TestClient(create_app(analyzer, settings=ServeSettings(max_upload_bytes=limit))) as small:
        too_big = b"\x89PNG\r\n\x1a\n" + bytes(limit)  # limit + 8 bytes in the file part
        r = small.post("/api/v1/predict", **upload(too_big))
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        # Announced by Content-Length far past the limit: refused without reading the body.
        r = small.post(
            "/api/v1/predict",
            content=bytes(limit + FORM_OVERHEAD + 1),
            headers={"content-type": "multipart/form-data; boundary=XyZ"},
        )
        assert r.status_code == 413
        assert len(png_bytes) <= limit  # a real 256 px NIH image fits and still gets its answer
        assert_still_serving(small, png_bytes)


async def _chunks(consumed: list[int], n: int, size: int):
    yield (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n')
    for _ in range(n):
        consumed.append(size)
        yield bytes(size)


def test_upload_limit_is_enforced_while_reading_not_after():
    consumed: list[int] = []
    with pytest.raises(UploadError) as err:  # no Content-Length (chunked): stop at the limit
        asyncio.run(
            read_file_field(
                "multipart/form-data; boundary=XyZ", None, _chunks(consumed, n=1000, size=64 * 1024), max_bytes=200_000
            )
        )
    assert err.value.status == 413
    assert sum(consumed) <= 200_000 + 64 * 1024  # stopped within one chunk of the limit, not at 64 MB
    consumed.clear()
    with pytest.raises(UploadError) as err:  # Content-Length past the limit: nothing read at all
        asyncio.run(
            read_file_field(
                "multipart/form-data; boundary=XyZ",
                str(10**9),
                _chunks(consumed, n=1000, size=64 * 1024),
                max_bytes=200_000,
            )
        )
    assert err.value.status == 413 and consumed == []


def test_read_file_field_keeps_only_the_file_part():
    body = (
        b'--B\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        b"\x89PNG-bytes\r\n--B--\r\n"
    )

    async def one():
        yield body

    assert (
        asyncio.run(read_file_field("multipart/form-data; boundary=B", str(len(body)), one(), 100)) == b"\x89PNG-bytes"
    )


def test_concurrent_requests_give_the_sequential_answers(client, sample_images):
    datas = [p.read_bytes() for p in sample_images[:4]] * 2
    sequential = [client.post("/api/v1/predict", **upload(d)).json() for d in datas]

    def predict(d: bytes) -> dict:
        return client.post("/api/v1/predict", **upload(d)).json()

    def cam(d: bytes) -> int:
        return client.post("/api/v1/cam?finding=Effusion", **upload(d)).status_code

    with ThreadPoolExecutor(8) as pool:
        cams = [pool.submit(cam, d) for d in datas[:3]]  # Grad-CAM (hooks, gradients) mixed in
        parallel = list(pool.map(predict, datas))
        assert [c.result() for c in cams] == [200] * 3
    for got, want in zip(parallel, sequential):
        assert [f["finding"] for f in got["findings"]] == [f["finding"] for f in want["findings"]]
        np.testing.assert_allclose(
            [f["probability"] for f in got["findings"]], [f["probability"] for f in want["findings"]], atol=1e-6
        )


# -- Grad-CAM and analyses --------------------------------------------------------------


def test_cam_is_the_overlay_of_explain(client, analyzer, png_bytes):
    from chestxray.inference.explain import explain, overlay

    r = client.post("/api/v1/cam?finding=Effusion", **upload(png_bytes))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = np.asarray(decode_png(r.content))
    gray = read_image(png_bytes)
    _, cams = explain(analyzer, gray, ["Effusion"])
    assert got.shape == gray.shape + (3,)
    np.testing.assert_array_equal(got, overlay(gray, cams[0].heatmap))
    # NIH spelling and case are accepted, like the CLI.
    for name in ("Infiltrate", "effusion"):
        assert client.post(f"/api/v1/cam?finding={name}", **upload(png_bytes)).status_code == 200


def test_cam_unknown_or_missing_finding_is_422(client, png_bytes):
    r = client.post("/api/v1/cam?finding=Broken_Bone", **upload(png_bytes))
    assert r.status_code == 422
    assert "Broken_Bone" in r.json()["detail"] and "Effusion" in r.json()["detail"]
    assert client.post("/api/v1/cam", **upload(png_bytes)).status_code == 422
    assert_still_serving(client, png_bytes)


def test_analysis_lifecycle(client, png_bytes):
    r = client.post("/api/v1/analyses", **upload(png_bytes))
    assert r.status_code == 201, r.text
    a = r.json()
    gray = read_image(png_bytes)
    assert (a["height"], a["width"]) == gray.shape and a["expires_in_s"] > 0
    assert a["prediction"]["file"] == "upload" and SECRET_NAME not in r.text
    stateless = client.post("/api/v1/predict", **upload(png_bytes)).json()
    assert a["prediction"] == stateless

    np.testing.assert_array_equal(np.asarray(decode_png(client.get(a["image_url"]).content)), gray)
    cam = client.get(a["cam_url"], params={"finding": "Effusion"})
    assert cam.status_code == 200
    assert cam.content == client.post("/api/v1/cam?finding=Effusion", **upload(png_bytes)).content
    assert client.get(a["cam_url"], params={"finding": "effusion"}).content == cam.content  # cached
    assert client.get(a["cam_url"], params={"finding": "Nope"}).status_code == 422

    assert client.delete(f"/api/v1/analyses/{a['id']}").status_code == 204
    gone = client.get(a["image_url"])
    assert gone.status_code == 404 and "upload the image again" in gone.json()["detail"]
    assert client.get(a["cam_url"], params={"finding": "Effusion"}).status_code == 404
    assert client.delete(f"/api/v1/analyses/{a['id']}").status_code == 404


def test_large_images_are_downscaled_for_display(analyzer):
    with TestClient(create_app(analyzer, display_max_side=300)) as c:
        a = c.post("/api/v1/analyses", **upload(EXAMPLE.read_bytes())).json()
        assert (a["width"], a["height"]) == (300, 300)
        assert decode_png(c.get(a["image_url"]).content).size == (300, 300)
        assert decode_png(c.get(a["cam_url"], params={"finding": "Mass"}).content).size == (300, 300)


def test_result_store_expires_and_keeps_within_its_byte_budget():
    now = [0.0]
    store = ResultStore(ttl_s=60, max_bytes=2500, clock=lambda: now[0])

    def item() -> Analysis:
        from chestxray.inference.predict import Prediction

        return Analysis(np.zeros((30, 30), np.uint8), np.zeros((10, 10), np.uint8), Prediction("upload", "m"))

    a = store.add(item())
    now[0] = 30
    b = store.add(item())
    assert store.get(a) is not None and len(store) == 2
    c = store.add(item())  # 3 x 1000 bytes > 2500: the least recently used (b) goes
    assert store.get(b) is None and store.get(a) is not None and store.get(c) is not None
    now[0] = 61  # a is older than the ttl
    assert store.get(a) is None and store.get(c) is not None
    assert store.remove(c) and not store.remove(c) and len(store) == 0


def test_display_shape_keeps_aspect():
    assert render.display_shape((3000, 2000), 1024) == (1024, 683)
    assert render.display_shape((200, 100), 1024) == (200, 100)
    small = render.fit(np.linspace(0, 1, 2000 * 1000, dtype=np.float32).reshape(2000, 1000), 500)
    assert small.shape == (500, 250) and small.dtype == np.float32


# -- model, health, OpenAPI, page --------------------------------------------------------


def test_model_endpoint(client, analyzer):
    m = client.get("/api/v1/model").json()
    assert m["name"] == "tiny-test-model" and m["backend"] == "torch" and m["grad_cam"] is True
    assert m["labels"] == list(FINDINGS)
    assert m["thresholds"] == pytest.approx(dict(zip(FINDINGS, analyzer.thresholds.tolist())))
    assert m["preprocessing"]["size"] == 64
    assert m["training"] == {"data": "none (random weights, for tests)"}
    assert m["note"] == NOT_FOR_CLINICAL_USE and m["max_upload_bytes"] == 2 * 2**20
    assert client.get("/healthz").json() == {"status": "ok", "model": "tiny-test-model"}


def test_openapi_lists_the_endpoints_with_their_models(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"post"} <= set(paths["/api/v1/predict"]) and {"post"} <= set(paths["/api/v1/cam"])
    assert "post" in paths["/api/v1/analyses"] and "get" in paths["/api/v1/model"] and "get" in paths["/healthz"]
    assert "get" in paths["/api/v1/analyses/{analysis_id}/image.png"]
    assert "delete" in paths["/api/v1/analyses/{analysis_id}"]
    predict = paths["/api/v1/predict"]["post"]
    form = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and form["properties"]["file"]["format"] == "binary"
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ok.rsplit("/", 1)[1]]
    assert set(schema["properties"]) == {
        "file",
        "model",
        "variant",
        "findings",
        "error",
        "warnings",
        "threshold_policy",
    }
    assert {"413", "415", "422"} <= set(predict["responses"])
    assert "image/png" in paths["/api/v1/cam"]["post"]["responses"]["200"]["content"]
    assert "/" not in paths and "tiny-test-model" in spec["info"]["description"]


def test_page_is_self_contained_and_says_not_for_clinical_use(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "tiny-test-model" in page and NOT_FOR_CLINICAL_USE in page
    assert page.lower().count("not for clinical use") == 1, "the banner says it once"
    limit = client.app.state.settings.max_upload_bytes / 2**20
    assert f"up to {limit:.4g} MiB" in page and " MB " not in page  # the limit is in MiB (2**20 bytes)
    assert 'aria-live="polite"' in page and '<label for="file"' in page
    assert "{{" not in page and "http://" not in page and "https://" not in page
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        s = client.get(f"/static/{name}")
        assert s.status_code == 200 and s.headers["content-type"].startswith(ctype)
        assert "http://" not in s.text and "https://" not in s.text
    assert decode_png(client.get("/static/cam-legend.png").content).size == (256, 12)
    assert client.get("/static/index.html").status_code == 404
    assert client.get("/static/nope.js").status_code == 404
    assert client.get("/docs").status_code == 404  # Swagger UI would load scripts from a CDN


# -- the command -------------------------------------------------------------------------


def test_serve_command_defaults_to_loopback_and_applies_its_options(tiny_bundle, monkeypatch):
    import uvicorn

    from chestxray.cli import main

    seen = {}

    def record_instead_of_serving(server, sockets=None):  # keep the config; do not block on a socket
        seen["config"] = server.config
        seen["port"] = sockets[0].getsockname()[1]

    monkeypatch.setattr(uvicorn.Server, "run", record_instead_of_serving)
    with socket.socket() as probe:  # a port that is free now
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert main(["serve", "--model", str(tiny_bundle), "--port", str(free), "--max-upload-mb", "3"]) == 0
    config = seen["config"]
    assert (config.host, config.port, config.access_log, seen["port"]) == ("127.0.0.1", free, False, free)
    assert config.app.state.settings.max_upload_bytes == 3 * 2**20
    assert config.app.state.analyzer.name == "tiny-test-model"


def test_serve_port_0_prints_the_port_the_system_chose(tiny_bundle, monkeypatch, capsys):
    import re

    import uvicorn

    from chestxray.cli import main

    seen = {}
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda server, sockets=None: seen.update(port=sockets[0].getsockname()[1])
    )
    assert main(["serve", "--model", str(tiny_bundle), "--port", "0"]) == 0
    shown = re.search(r"at http://127\.0\.0\.1:(\d+)/", capsys.readouterr().err)
    assert shown and int(shown.group(1)) == seen["port"] > 0
    # A port in use is a one-line error, not uvicorn's exit.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--model", str(tiny_bundle), "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1 port" in err and "Traceback" not in err


def test_serve_command_fails_clearly(tmp_path, capsys):
    from chestxray.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "no model bundle there" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_access_log_keeps_paths_only():
    from chestxray.commands.serve import RedactAccessLog, is_loopback, redact_path

    assert redact_path("/api/v1/cam?finding=Effusion") == "/api/v1/cam"
    assert redact_path("/api/v1/analyses/AbC123/cam.png?finding=Mass") == "/api/v1/analyses/<id>/cam.png"
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/api/v1/analyses/AbC123/image.png?x=1", "1.1", 200),
        None,
    )
    assert RedactAccessLog().filter(record)
    assert "AbC123" not in record.getMessage() and "/api/v1/analyses/<id>/image.png" in record.getMessage()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


@pytest.mark.slow
def test_onnx_backend_serves_findings_and_grad_cam_when_the_file_has_maps(tiny_bundle, tmp_path, png_bytes, analyzer):
    pytest.importorskip("onnxruntime")
    from cam_helpers import export_without_cam
    from chestxray.export.onnx import export_bundle
    from chestxray.inference.predict import Analyzer

    onnx_path = tmp_path / "tiny.onnx"
    export_bundle(tiny_bundle, onnx_path)
    with TestClient(create_app(Analyzer.load(onnx_path, backend="onnx"))) as c:
        m = c.get("/api/v1/model").json()
        assert m["backend"] == "onnx" and m["grad_cam"] is True and m["name"] == "tiny-test-model"
        r = c.post("/api/v1/predict", **upload(png_bytes))
        assert r.status_code == 200
        want = analyzer.predict(png_bytes, names=["upload"])
        assert r.json()["findings"][0]["finding"] == want.findings[0].finding
        cam = c.post("/api/v1/cam?finding=Effusion", **upload(png_bytes))
        assert cam.status_code == 200 and cam.content.startswith(b"\x89PNG")
        a = c.post("/api/v1/analyses", **upload(png_bytes)).json()
        assert a["cam_url"] is not None
    # An ONNX file without the maps (older exports, DenseNets): findings, and 501 for Grad-CAM.
    nocam = export_without_cam(tiny_bundle, tmp_path / "nocam.onnx")
    with TestClient(create_app(Analyzer.load(nocam, backend="onnx"))) as c:
        assert c.get("/api/v1/model").json()["grad_cam"] is False
        cam = c.post("/api/v1/cam?finding=Effusion", **upload(png_bytes))
        assert cam.status_code == 501 and "'cam' output" in cam.json()["detail"]
        a = c.post("/api/v1/analyses", **upload(png_bytes)).json()
        assert a["cam_url"] is None
        assert c.get(f"/api/v1/analyses/{a['id']}/cam.png", params={"finding": "Effusion"}).status_code == 501
        assert c.get("/static/cam-legend.png").status_code == 404


def test_cam_of_an_empty_map_says_no_positive_evidence():
    """A black image gives the brightness model an all-zero Grad-CAM: the PNG is the plain
    radiograph (no uniform blue), and a header carries the note the viewer shows."""
    from cam_helpers import brightness_analyzer

    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(buf, format="PNG")
    black = buf.getvalue()
    with TestClient(create_app(brightness_analyzer())) as c:
        r = c.post("/api/v1/cam?finding=Mass", **upload(black))
        assert r.status_code == 200 and r.headers["x-grad-cam-note"] == "no positive evidence for Mass"
        rgb = np.asarray(decode_png(r.content).convert("RGB")).astype(int)
        assert np.array_equal(rgb[..., 0], rgb[..., 2]) and np.array_equal(rgb[..., 1], rgb[..., 2])
        a = c.post("/api/v1/analyses", **upload(black)).json()
        for _ in range(2):  # computed, then from the cache: the note stays
            r = c.get(a["cam_url"], params={"finding": "Mass"})
            assert r.headers["x-grad-cam-note"] == "no positive evidence for Mass"
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 56), 255, np.uint8)).save(buf, format="PNG")
        r = c.post("/api/v1/cam?finding=Mass", **upload(buf.getvalue()))
        assert r.status_code == 200 and "x-grad-cam-note" not in r.headers
