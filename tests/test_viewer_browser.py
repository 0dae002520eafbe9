"""The reading viewer in real headless Chromium, on a 16-bit DICOM built here: canvas pixels
follow the window/level math, the heat map fades and stays registered under zoom, Invert,
the shortcuts, and every control reachable by keyboard with an accessible name.

One page load is shared by the tests of this module (they run in file order).
Set CHESTXRAY_VIEWER_DOCS=docs to save the documentation screenshots.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser_helpers import CHROMIUM, CHROMIUM_ARGS, EXAMPLE, page_with_errors, serve_in_thread
from chestxray.serve.viewer_routes import blend, window_lut
from dicom_helpers import dicom_bytes

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
H, W = 150, 200
SQUARE = (slice(60, 80), slice(80, 120))  # the landmark: 20 x 40 px of the brightest value
WINDOW = (1500.0, 2500.0)
LOWEST = 200  # pixels.png stores value - lowest value; the page's window is in those units
STORED_WINDOW = (WINDOW[0] - LOWEST, WINDOW[1])


def stored_values() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    img = (200 + xx * 12 + yy * 5).astype(np.uint16)  # 200 .. 3333: every column distinct
    img[SQUARE] = 4000
    return img


@pytest.fixture(scope="module")
def page(tiny_bundle, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    from chestxray.inference.predict import Analyzer
    from chestxray.serve.app import create_app

    dcm = tmp_path_factory.mktemp("dicom") / "study.dcm"
    dcm.write_bytes(dicom_bytes(stored_values(), bits=12, window=WINDOW))
    docs = bool(os.environ.get("CHESTXRAY_VIEWER_DOCS"))  # the pictures show the bundled model
    analyzer = Analyzer.load(None, backend="torch") if docs else Analyzer.load(tiny_bundle)
    app = create_app(analyzer)
    with serve_in_thread(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            pg, problems = page_with_errors(browser, viewport={"width": 1400, "height": 1000})
            pg.goto(url + "/")
            pg.set_input_files("#file", str(dcm))
            pg.wait_for_function("() => document.querySelectorAll('#findings li').length === 14", timeout=30_000)
            pg.wait_for_function("() => !!document.getElementById('view').dataset.view")
            pg.problems = problems  # type: ignore[attr-defined]
            yield pg
            assert problems == []
        finally:
            browser.close()


def view(page, canvas: str = "view") -> dict:
    settle(page)
    return json.loads(page.eval_on_selector(f"#{canvas}", "c => c.dataset.view"))


def window(page) -> dict:
    return json.loads(page.eval_on_selector("#view", "c => c.dataset.window"))


def settle(page) -> None:
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def canvas_rgb(page, canvas: str = "view") -> np.ndarray:
    """The canvas' device pixels as HxWx3."""
    settle(page)
    url = page.eval_on_selector(f"#{canvas}", "c => c.toDataURL('image/png')")
    import base64

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def image_region(page, canvas: str = "view") -> np.ndarray:
    """At 1:1, the canvas pixels that show the image, as an H x W x 3 array."""
    t = view(page, canvas)
    assert t["s"] == 1
    rgb = canvas_rgb(page, canvas)
    return rgb[t["ty"] : t["ty"] + H, t["tx"] : t["tx"] + W]


def sample(page, points: list[tuple[int, int]], canvas: str = "view") -> np.ndarray:
    """Canvas pixels at the centres of image pixels (row, col), through the view transform."""
    t = view(page, canvas)
    rgb = canvas_rgb(page, canvas)
    return np.array([rgb[int(t["ty"] + t["s"] * (r + 0.5)), int(t["tx"] + t["s"] * (c + 0.5))] for r, c in points])


def test_drag_windows_the_16_bit_values_as_the_lut_predicts(page):
    values = stored_values().astype(np.float64) - LOWEST
    page.locator("#view").focus()
    page.keyboard.press("1")
    w0 = window(page)
    assert (w0["centre"], w0["width"]) == STORED_WINDOW  # the DICOM's own window first
    assert page.get_by_label("Centre").input_value() == "1500"  # shown in the DICOM's values
    shown = image_region(page)
    expected = window_lut(values, *STORED_WINDOW)
    np.testing.assert_array_equal(shown[..., 0], expected)
    assert (shown[..., 0] == shown[..., 1]).all()

    box = page.locator("#view").bounding_box()
    x, y = box["x"] + 100, box["y"] + 100
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 60, y - 40, steps=4)
    page.mouse.up()
    step = (4000 - 200 + 1) / 512  # the image's range over 512 px
    after = window(page)
    assert after["centre"] == pytest.approx(STORED_WINDOW[0] - 40 * step)
    assert after["width"] == pytest.approx(STORED_WINDOW[1] + 60 * step)
    shown = image_region(page)
    np.testing.assert_array_equal(shown[..., 0], window_lut(values, after["centre"], after["width"]))
    assert not np.array_equal(shown[..., 0], expected)

    page.keyboard.press("i")  # Invert
    np.testing.assert_array_equal(image_region(page)[..., 0], 255 - window_lut(values, after["centre"], after["width"]))
    page.keyboard.press("i")


def heat_with_evidence(page) -> tuple[str, np.ndarray, float]:
    """The first finding whose Grad-CAM has evidence: name, its colour layer, its alpha."""
    base = page.eval_on_selector("#dl-json", "a => a.href").rsplit("/", 1)[0]
    for name in page.locator("#findings li .name").all_inner_texts():
        resp = page.request.get(f"{base}/heat.png?finding={name}")
        assert resp.ok
        alpha = float(resp.headers["x-grad-cam-alpha"])
        if alpha > 0:
            return name, np.asarray(Image.open(io.BytesIO(resp.body())).convert("RGB")), alpha
    raise AssertionError("no finding of the tiny model has a Grad-CAM with evidence")


def test_opacity_fades_between_plain_image_and_overlay(page):
    values = stored_values().astype(np.float64) - LOWEST
    name, heat, alpha = heat_with_evidence(page)
    page.get_by_role("button", name=f"Grad-CAM overlay for {name}").click()
    page.wait_for_function(f"() => document.getElementById('view').dataset.heat === {json.dumps(name)}")
    page.locator("#view").focus()
    page.keyboard.press("r")  # reset: the DICOM window, fit, opacity 100%
    page.keyboard.press("1")
    lut = window_lut(values, *STORED_WINDOW)
    layer = type("Layer", (), {"rgb": heat, "alpha": alpha})()
    overlay = blend(lut, layer, 1.0)
    np.testing.assert_array_equal(image_region(page), overlay)  # opacity 1: the overlay's pixels
    slider = page.get_by_label("Heatmap opacity")
    slider.focus()
    page.keyboard.press("Home")
    assert page.locator("#opacity-value").inner_text() == "0%"
    plain = image_region(page)
    np.testing.assert_array_equal(plain, np.repeat(lut[..., None], 3, axis=2))  # opacity 0: the plain image
    for _ in range(10):
        page.keyboard.press("ArrowRight")  # 5% a step
    assert page.locator("#opacity-value").inner_text() == "50%"
    np.testing.assert_array_equal(image_region(page), blend(lut, layer, 0.5))
    page.keyboard.press("End")


def test_zoom_doubles_the_landmark_and_the_overlay_stays_registered(page):
    values = stored_values().astype(np.float64) - LOWEST
    _, heat, alpha = heat_with_evidence(page)
    layer = type("Layer", (), {"rgb": heat, "alpha": alpha})()
    page.locator("#view").focus()
    page.keyboard.press("f")
    page.keyboard.press("a")  # full range: the landmark alone is white
    w = window(page)
    composite = blend(window_lut(values, w["centre"], w["width"]), layer, 1.0)
    plain = window_lut(values, w["centre"], w["width"])

    def landmark_width() -> int:
        page.keyboard.press("o")  # heat map off: measure the plain landmark
        rgb = canvas_rgb(page)
        page.keyboard.press("o")
        cols = np.where((rgb[..., 0] == 255).any(axis=0))[0]
        assert plain[SQUARE].min() == 255 and cols.size
        return int(cols.max() - cols.min() + 1)

    rows, cols = np.mgrid[55:85:3, 75:125:4]  # across the landmark's edges
    points = list(zip(rows.ravel().tolist(), cols.ravel().tolist(), strict=True))
    before = landmark_width()
    np.testing.assert_array_equal(sample(page, points), composite[rows.ravel(), cols.ravel()])
    s0 = view(page)["s"]
    page.get_by_role("button", name="Zoom in").click()
    assert view(page)["s"] == pytest.approx(2 * s0)
    after = landmark_width()
    assert abs(after - 2 * before) <= 2, (before, after)
    np.testing.assert_array_equal(sample(page, points), composite[rows.ravel(), cols.ravel()])


def test_shortcuts_and_side_by_side(page):
    page.locator("#view").focus()
    page.keyboard.press("?")
    help_panel = page.get_by_role("dialog", name="Keyboard shortcuts")
    assert help_panel.is_visible() and "Lung window" in help_panel.inner_text()
    page.keyboard.press("Escape")
    assert help_panel.is_hidden()
    assert page.evaluate("document.activeElement.id") == "help-toggle"  # focus is not lost
    page.locator("#view").focus()
    values = np.sort(stored_values().ravel()) - LOWEST
    page.keyboard.press("l")
    lo, hi = (int(values[int(np.ceil(q * values.size)) - 1]) for q in (0.02, 0.7))
    assert window(page)["centre"] == pytest.approx((lo + hi + 1) / 2)
    page.keyboard.press("d")
    assert (window(page)["centre"], window(page)["width"]) == STORED_WINDOW
    page.keyboard.press("p")
    assert page.locator("#mode-pan").get_attribute("aria-pressed") == "true"
    t0 = view(page)
    page.keyboard.press("ArrowLeft")
    assert view(page)["tx"] > t0["tx"]
    page.keyboard.press("p")
    page.keyboard.press("s")
    assert page.locator("#view-plain").is_visible()
    settle(page)
    assert view(page, "view-plain")["s"] == view(page)["s"]  # both panes share the zoom
    page.keyboard.press("s")
    assert page.locator("#view-plain").is_hidden()


def test_every_control_is_reachable_by_keyboard_and_named(page):
    page.locator("#file").focus()
    reached = set()
    for _ in range(80):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("() => document.activeElement.id || document.activeElement.dataset.preset"))
    controls = page.eval_on_selector_all(
        "#result button:not([disabled]), #result input, #result a[href], #result canvas:not([hidden]), #help-toggle",
        "els => els.filter(e => e.offsetParent !== null).map(e => e.id || e.dataset.preset)",
    )
    aria_free = [c for c in controls if not c]  # the Grad-CAM toggles, checked by name below
    assert len(aria_free) == 14
    missing = sorted(c for c in controls if c and c not in reached)
    assert missing == []
    cdp = page.context.new_cdp_session(page)
    nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    unnamed = [
        n["role"]["value"]
        for n in nodes
        if any(p["name"] == "focusable" and p["value"]["value"] for p in n.get("properties", []))
        and not n.get("ignored")
        and not (n.get("name") or {}).get("value")
        and n["role"]["value"] not in ("RootWebArea", "dialog")
    ]
    assert unnamed == []


@pytest.mark.skipif(not os.environ.get("CHESTXRAY_VIEWER_DOCS"), reason="set CHESTXRAY_VIEWER_DOCS=docs")
def test_docs_screenshots(page):
    """The screenshots of docs/viewer.md on an NIH image: lung window; zoomed with a half-faded
    heat map; side by side (the Studies list: test_viewer_studies.py). Run last: it replaces the
    page's image."""
    folder = Path(os.environ["CHESTXRAY_VIEWER_DOCS"])
    folder.mkdir(parents=True, exist_ok=True)

    def shot(selector: str, name: str, dither: Image.Dither = Image.Dither.FLOYDSTEINBERG) -> None:
        settle(page)
        page.mouse.move(0, 0)
        page.evaluate("() => document.activeElement && document.activeElement.blur()")
        png = page.locator(selector).screenshot()
        small = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, dither=dither)
        small.save(folder / name, optimize=True)

    page.set_input_files("#file", str(EXAMPLE))
    page.wait_for_function("() => document.querySelector('#status').textContent === 'Analysis done (8-bit image).'")
    page.locator("#view").focus()
    page.keyboard.press("l")
    shot("#result", "viewer-lung-window.png", Image.Dither.NONE)  # grays: 256 colours suffice
    page.locator(".cam-toggle").first.click()
    page.wait_for_function("() => document.getElementById('caption').textContent.startsWith('Grad-CAM for')")
    page.get_by_label("Heatmap opacity").fill("50")
    page.locator("#view").focus()
    page.keyboard.press("+")
    shot(".viewer", "viewer-zoomed-half-heatmap.png")
    page.keyboard.press("f")
    page.keyboard.press("s")
    shot(".viewer", "viewer-side-by-side.png")
