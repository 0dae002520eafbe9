"""End to end in real headless Chromium: the viewer uploads a real radiograph, shows the
ranked findings, and lays a Grad-CAM over the image, driven by the keyboard.

Set CHESTXRAY_VIEWER_SCREENSHOT=FILE.png to save the page as it ends up (the docs screenshots come from
tests/test_viewer_browser.py with CHESTXRAY_VIEWER_DOCS=docs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from browser_helpers import CHROMIUM, CHROMIUM_ARGS, EXAMPLE, page_with_errors, serve_in_thread
from chestxray import NOT_FOR_CLINICAL_USE

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (`make browser` installs it; `make test` does that first)",
    ),
]


@pytest.fixture(scope="module")
def server_url(tiny_bundle) -> Iterator[str]:
    """The real app with a tiny model."""
    from chestxray.inference.predict import Analyzer
    from chestxray.serve.app import create_app

    with serve_in_thread(create_app(Analyzer.load(tiny_bundle))) as url:
        yield url


def test_upload_shows_findings_and_keyboard_toggles_gradcam(server_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page, problems = page_with_errors(browser, viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server_url + "/")

            expect(page.locator("#model-name")).to_have_text("tiny-test-model")
            expect(page.locator("#studies")).to_be_hidden()  # no PACS options: the upload viewer alone
            expect(page.get_by_role("note")).to_contain_text(NOT_FOR_CLINICAL_USE)

            # A broken file: an alert with the server's reason, and the page stays usable.
            bad = tmp_path / "notes.png"
            bad.write_bytes(b"not an image at all")
            page.set_input_files("#file", str(bad))
            expect(page.get_by_role("alert")).to_contain_text("not a PNG, JPEG or DICOM image")
            assert [m for m in problems if "415" not in m] == []  # Chromium logs the 415 itself
            problems.clear()

            page.set_input_files("#file", str(EXAMPLE))
            rows = page.locator("#findings li")
            expect(rows).to_have_count(14, timeout=30_000)
            expect(page.get_by_role("alert")).to_be_hidden()
            # The summary is said once, next to the findings (the status line says the analysis is done).
            expect(page.locator("#summary")).to_contain_text("above threshold")
            expect(page.get_by_role("status")).to_have_text("Analysis done (8-bit image).")
            # The server-decoded radiograph is drawn on the canvas.
            page.wait_for_function("() => !!document.getElementById('view').dataset.view")
            # An 8-bit image starts as it is: the window 0..255.
            assert page.evaluate("() => JSON.parse(document.getElementById('view').dataset.window)") == {
                "centre": 128,
                "width": 256,
                "invert": False,
            }
            # Ranked: positives first, then by probability; each row has a threshold tick.
            probs = [float(t.rstrip("%")) for t in rows.locator(".prob").all_inner_texts()]
            positive = [("positive" in (c or "")) for c in [rows.nth(i).get_attribute("class") for i in range(14)]]
            assert positive == sorted(positive, reverse=True)
            n_pos = sum(positive)
            assert probs[:n_pos] == sorted(probs[:n_pos], reverse=True)
            assert probs[n_pos:] == sorted(probs[n_pos:], reverse=True)
            assert rows.locator(".bar .tick").count() == 14

            # Keyboard only: Tab onto the first Grad-CAM toggle and press Space.
            first = rows.nth(0)
            name = first.locator(".name").inner_text()
            toggle = first.get_by_role("button", name=f"Grad-CAM overlay for {name}")
            page.locator("#forget").focus()
            page.keyboard.press("Tab")
            expect(toggle).to_be_focused()
            page.keyboard.press("Space")
            expect(toggle).to_have_attribute("aria-pressed", "true")
            view = page.locator("#view")
            expect(view).to_have_attribute("data-heat", name, timeout=30_000)
            expect(page.locator("#caption")).to_contain_text(f"Grad-CAM for {name}")
            expect(page.get_by_role("status")).to_contain_text(f"Grad-CAM for {name} shown")

            # Another finding's toggle replaces the overlay; pressing it again hides it.
            second = rows.nth(1).locator(".cam-toggle")
            second_name = rows.nth(1).locator(".name").inner_text()
            second.click()
            expect(second).to_have_attribute("aria-pressed", "true")
            expect(toggle).to_have_attribute("aria-pressed", "false")
            expect(view).to_have_attribute("data-heat", second_name, timeout=30_000)
            second.press("Enter")
            expect(second).to_have_attribute("aria-pressed", "false")
            expect(page.locator("#caption")).to_have_text("Radiograph as analysed by the server.")

            shot = os.environ.get("CHESTXRAY_VIEWER_SCREENSHOT")
            if shot:
                toggle.click()
                expect(view).to_have_attribute("data-heat", name, timeout=30_000)
                page.mouse.move(0, 0)  # no hover or focus styles in the picture
                page.evaluate("() => document.activeElement && document.activeElement.blur()")
                page.screenshot(path=shot, full_page=True)

            # A failed upload after a good one: the error alone, no stale image or findings under it.
            page.set_input_files("#file", str(bad))
            expect(page.get_by_role("alert")).to_contain_text("not a PNG, JPEG or DICOM image")
            expect(page.locator("#result")).to_be_hidden()
            expect(page.locator("#findings li")).to_have_count(0)
            assert page.evaluate(
                "() => { const c = document.getElementById('view');"  # no stale pixels
                " return c.getContext('2d').getImageData(0, 0, c.width, c.height)"
                ".data.every((v) => v === 0); }"
            )
            problems[:] = [m for m in problems if "415" not in m]

            assert problems == []
            assert all(u.startswith(server_url) or u.startswith(("blob:", "data:")) for u in requests), requests
        finally:
            browser.close()
