"""In real headless Chromium: the viewer shows the input check's warning next to
the findings, and the threshold policy, for the bundled model."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from browser_helpers import CHROMIUM, CHROMIUM_ARGS, EXAMPLE, serve_in_thread

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture(scope="module")
def bundled_url() -> Iterator[str]:
    from chestxray.inference.predict import Analyzer
    from chestxray.serve.app import create_app

    with serve_in_thread(create_app(Analyzer.load())) as url:
        yield url


def test_viewer_shows_the_warning_and_the_policy(bundled_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256)).astype(np.uint8)).save(noise)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(bundled_url + "/")
            page.set_input_files("#file", str(noise))
            expect(page.locator("#findings li")).to_have_count(14, timeout=30_000)
            expect(page.locator("#warnings")).to_be_visible()
            expect(page.locator("#warnings")).to_contain_text("unlike the frontal chest X-rays")
            expect(page.locator("#policy")).to_contain_text('operating point "f1"')
            page.set_input_files("#file", str(EXAMPLE))  # a real radiograph: no warning
            expect(page.locator("#warnings")).to_be_hidden(timeout=30_000)
            expect(page.locator("#findings li")).to_have_count(14)
        finally:
            browser.close()
