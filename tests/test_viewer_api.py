"""The viewer's routes: full-depth pixels of a DICOM, colour heat maps with captions worded
from the map and the decision, the JSON download and the PNG report."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from chestxray import NOT_FOR_CLINICAL_USE
from chestxray.serve.viewer_routes import FullDepth, cam_caption, default_window, window_lut
from dicom_helpers import dicom_bytes


def ramp16(h: int = 96, w: int = 128) -> np.ndarray:
    """12-bit stored values with a bright square: distinct values across the range."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = (xx * 3000 // w + yy * 8).astype(np.uint16)
    img[30:50, 40:70] = 4000
    return img


@pytest.fixture(scope="module")
def client(tiny_bundle):
    from fastapi.testclient import TestClient

    from chestxray.inference.predict import Analyzer
    from chestxray.serve.app import create_app

    with TestClient(create_app(Analyzer.load(tiny_bundle))) as c:
        yield c


def upload(client, data: bytes) -> dict:
    resp = client.post("/api/v1/analyses", files={"file": ("x", data)})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_dicom_pixels_are_full_depth_modality_values_with_its_window(client):
    stored = ramp16()
    data = dicom_bytes(stored, bits=12, slope=1.0, intercept=-1000.0, window=(1200.0, 2000.0))
    analysis = upload(client, data)
    assert client.get("/api/v1/viewer").json() == {"studies": False}  # no PACS: no Studies page
    info = client.get(f"/api/v1/analyses/{analysis['id']}/display").json()
    assert info["source"] == "DICOM" and (info["width"], info["height"]) == (128, 96)
    png = client.get(info["pixels_url"])
    img = Image.open(io.BytesIO(png.content))
    assert png.headers["content-type"] == "image/png" and img.mode.startswith("I")
    values = info["value_offset"] + info["value_slope"] * np.asarray(img, dtype=np.float64)
    np.testing.assert_array_equal(values, stored.astype(np.float64) - 1000.0)  # modality values, all 16 bits
    centre = info["value_offset"] + info["dicom_window"]["center"] * info["value_slope"]
    assert centre == pytest.approx(1200.0) and info["dicom_window"]["width"] == pytest.approx(2000.0)
    assert info["stored_max"] - info["stored_min"] == 4000 - int(stored.min())


def test_dicom_without_preamble_is_full_depth_too(client):
    analysis = upload(client, dicom_bytes(ramp16(), bits=12, preamble=False))
    assert client.get(f"/api/v1/analyses/{analysis['id']}/display").json()["source"] == "DICOM"


def test_monochrome1_is_flipped_so_that_larger_is_brighter(client):
    stored = ramp16()
    analysis = upload(client, dicom_bytes(stored, photometric="MONOCHROME1", bits=12, window=(2000.0, 4000.0)))
    info = client.get(f"/api/v1/analyses/{analysis['id']}/display").json()
    img = np.asarray(Image.open(io.BytesIO(client.get(info["pixels_url"]).content)), dtype=np.float64)
    values = info["value_offset"] + info["value_slope"] * img
    np.testing.assert_array_equal(values, -stored.astype(np.float64))
    assert info["value_offset"] + info["dicom_window"]["center"] * info["value_slope"] == pytest.approx(-2000.0)
    # The DICOM's own window on these values gives the server's 8-bit decode, within rounding.
    shown = window_lut(img, info["dicom_window"]["center"], info["dicom_window"]["width"])
    display = np.asarray(Image.open(io.BytesIO(client.get(analysis["image_url"]).content)))
    assert np.abs(shown.astype(int) - display.astype(int)).max() <= 1


def test_8_bit_upload_gives_its_display_values(client):
    gray = (np.arange(64 * 80).reshape(64, 80) % 251).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    analysis = upload(client, buf.getvalue())
    info = client.get(f"/api/v1/analyses/{analysis['id']}/display").json()
    assert info["source"] == "8-bit image" and info["dicom_window"] is None
    img = np.asarray(Image.open(io.BytesIO(client.get(info["pixels_url"]).content)))
    np.testing.assert_array_equal(img, gray)


def test_heat_layer_caption_json_and_report(client):
    analysis = upload(client, dicom_bytes(ramp16(), bits=12))
    info = client.get(f"/api/v1/analyses/{analysis['id']}/display").json()
    finding = analysis["prediction"]["findings"][0]
    resp = client.get(info["heat_url"], params={"finding": finding["finding"]})
    assert resp.status_code == 200
    heat = np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB"))
    assert heat.shape == (96, 128, 3)
    assert float(resp.headers["X-Grad-CAM-Alpha"]) in (0.0, 0.45)
    assert resp.headers["X-Grad-CAM-Caption"].startswith(f"Grad-CAM for {finding['finding']}")
    assert client.get(info["heat_url"], params={"finding": "Nope"}).status_code == 422

    result = client.get(info["result_url"])
    assert "attachment" in result.headers["content-disposition"]
    assert result.json()["findings"] == analysis["prediction"]["findings"]
    assert result.json()["note"] == NOT_FOR_CLINICAL_USE

    report = client.get(
        info["report_url"], params={"finding": finding["finding"], "center": 1500, "width": 3000, "opacity": 0.5}
    )
    assert report.status_code == 200 and "attachment" in report.headers["content-disposition"]
    page = Image.open(io.BytesIO(report.content))
    assert page.width == 1400 and page.height >= 800
    assert client.get(info["report_url"], params={"width": -1}).status_code == 422
    assert client.get("/api/v1/analyses/nope/report.png").status_code == 404


@pytest.mark.parametrize(
    ("positive", "evidence", "expected"),
    [
        (True, True, "raised its score (14.9%), above its threshold of 8.5%"),
        (False, True, "though not up to its threshold of 8.5%"),
        (True, False, "above its threshold of 8.5%, but the map singles out no region"),
        (False, False, "no region raised its score (14.9%), which stays below its threshold"),
    ],
)
def test_cam_caption_is_worded_from_the_map_and_the_decision(positive, evidence, expected):
    text = cam_caption("Effusion", 0.149, 0.085, positive, evidence)
    assert expected in text
    if positive:  # never "no evidence" next to ABOVE THRESHOLD
        assert "no positive evidence" not in text and "nothing in the image" not in text


def test_window_lut_follows_the_dicom_linear_window():
    x = np.array([0, 99, 100, 150, 200, 201, 4095])
    out = window_lut(x, centre=150.5, width=101.0)
    assert out[0] == 0 and out[-1] == 255 and out[3] == 128
    assert list(window_lut(x, 150.5, 101.0, invert=True)) == [255 - v for v in out]
    # An 8-bit image's starting window shows it as it is.
    eight = FullDepth(np.arange(256, dtype=np.uint16)[None], 0.0, 1.0, None, "8-bit image")
    np.testing.assert_array_equal(window_lut(eight.stored, *default_window(eight))[0], np.arange(256))


def test_large_dicom_pixels_are_registered_with_the_display_image(client):
    yy, xx = np.mgrid[0:1100, 0:1300]
    stored = (xx * 3 + yy).astype(np.uint16)  # 0 .. 4996, smooth: resizing keeps the ramp
    analysis = upload(client, dicom_bytes(stored, bits=13))
    info = client.get(f"/api/v1/analyses/{analysis['id']}/display").json()
    display = np.asarray(Image.open(io.BytesIO(client.get(analysis["image_url"]).content)))
    assert (info["height"], info["width"]) == display.shape == (866, 1024)
    img = np.asarray(Image.open(io.BytesIO(client.get(info["pixels_url"]).content)), dtype=np.float64)
    values = info["value_offset"] + info["value_slope"] * img
    # The pixel at display (r, c) shows the original near (r, c) x 1300 / 1024.
    for r, c in [(10, 10), (400, 500), (860, 1000)]:
        expected = 3 * (c + 0.5) * 1300 / 1024 + (r + 0.5) * 1100 / 866
        assert abs(values[r, c] - expected) < 4


def memory_pacs():
    from chestxray.serve.studies import StudyImage, StudyRow
    from pacs_double import MemoryPacs

    rows = [
        StudyRow(f"1.2.840.99.{i}", f"202611{i:02d}", f"ACC{i}", "CHEST PA", 1, False, f"Doe^Jane{i}")
        for i in range(1, 26)
    ]
    image = StudyImage(dicom_bytes(ramp16(), bits=12), "1.2.840.99.1.1", "1.2.840.99.1.1.1")
    return MemoryPacs(rows, {"1.2.840.99.3": image})


@pytest.mark.parametrize("names", [False, True])
def test_studies_list_pages_searches_and_hides_names_unless_asked(tiny_bundle, names):
    from fastapi.testclient import TestClient

    from chestxray.inference.predict import Analyzer
    from chestxray.serve.app import create_app
    from chestxray.serve.studies import studies_router

    pacs = memory_pacs()
    app = create_app(Analyzer.load(tiny_bundle))
    app.include_router(studies_router(pacs, show_patient_names=names))
    with TestClient(app) as c:
        assert c.get("/api/v1/viewer").json() == {"studies": True}
        first = c.get("/api/v1/studies").json()
        assert [s["accession"] for s in first["studies"]][:2] == ["ACC25", "ACC24"] and first["more"]
        assert len(first["studies"]) == 20
        assert (first["studies"][0]["patient_name"] == "Doe^Jane25") is names
        assert not names or first["studies"][0]["patient_name"]
        last = c.get("/api/v1/studies", params={"offset": 20}).json()
        assert len(last["studies"]) == 5 and not last["more"]
        hit = c.get("/api/v1/studies", params={"accession": "ACC7", "date_from": "20261101"}).json()
        assert [s["study_uid"] for s in hit["studies"]] == ["1.2.840.99.7"]
        for bad in ({"accession": "ACC*"}, {"date_from": "2026-11-01"}, {"limit": 500}):
            assert c.get("/api/v1/studies", params=bad).status_code == 422
        assert len(pacs.queries) == 3  # the refused ones never reached the PACS

        image = c.get("/api/v1/studies/1.2.840.99.3/image")
        assert image.headers["content-type"] == "application/dicom" and image.headers["x-sop-uid"] == "1.2.840.99.1.1.1"
        assert c.get("/api/v1/studies/1.2.840.99.4/image").status_code == 404
        assert c.get("/api/v1/studies/1.2.x/image").status_code == 422
        analysis = upload(c, image.content)
        params = {"analysis": analysis["id"], "series": "1.2.840.99.1.1", "sop": "1.2.840.99.1.1.1"}
        sent = c.post("/api/v1/studies/1.2.840.99.3/results", params=params)
        assert sent.status_code == 200 and sent.json()["sr_sop_instance_uid"] == "1.2.3.1"
        assert pacs.sent[0][3].findings[0].finding == analysis["prediction"]["findings"][0]["finding"]
        assert c.post("/api/v1/studies/1.2.840.99.3/results", params={**params, "analysis": "x"}).status_code == 404
        pacs.down = True
        down = c.get("/api/v1/studies")
        assert down.status_code == 502 and "connection refused" in down.json()["detail"]
