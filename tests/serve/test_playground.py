"""The playground at / in headless Chromium (Debian's package, driven by playwright): load the demo
image, ask, the answer streams in and its box is drawn where the answer's coordinates say."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workbench.data.boxes import denormalize_box
from workbench.eval.parse import parse_boxes

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
BOX_COLOUR = (31, 119, 180)  # the page's first palette colour, #1f77b4
DOCS_PNG = Path(__file__).resolve().parents[2] / "docs" / "playground.png"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium before the tests")
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield browser
        browser.close()


def test_playground_draws_the_answers_box(browser, box_server, demo_sample, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(box_server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.set_input_files("#file", str(demo_sample.image))
    page.wait_for_function("document.getElementById('picture').naturalWidth > 0 && "
                           "!document.getElementById('ask').disabled")
    page.fill("#question", f"Where is {demo_sample.ref}?")
    page.click("#ask")
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=30_000)
    page.wait_for_timeout(100)  # one frame for the overlay to paint
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    if os.environ.get("WORKBENCH_UPDATE_DOCS"):
        DOCS_PNG.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_PNG)

    answer = page.text_content("#answer")
    assert answer == demo_sample.answer and page.text_content("#status") == "done (stop)"
    [parsed] = parse_boxes(answer)
    ref, grid = parsed.ref, parsed.box
    assert parsed.problem is None
    width, height = Image.open(demo_sample.image).size
    x1, y1, x2, y2 = denormalize_box(grid, width, height)
    # The overlay's rectangle, in the image's own pixels, is the answer's box.
    rect = page.eval_on_selector("#overlay rect", "r => ['x', 'y', 'width', 'height'].map(k => +r.getAttribute(k))")
    assert rect == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert page.eval_on_selector("#overlay text", "t => t.textContent") == ref == demo_sample.ref

    # And on screen: the box's colour sits on the four edges where the answer's coordinates put them.
    img = page.eval_on_selector("#picture", "i => { const r = i.getBoundingClientRect(); "
                                            "return [r.left, r.top, r.width, r.height]; }")
    left, top, shown_w, shown_h = img
    sx, sy = shown_w / width, shown_h / height
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def colour_at(x, y):
        return pixels[round(top + y * sy), round(left + x * sx)]

    mid_x, mid_y = (x1 + x2) / 2, (y1 + y2) / 2
    for x, y in [(x1, mid_y), (x2, mid_y), (mid_x, y1), (mid_x, y2)]:
        assert np.abs(colour_at(x, y) - BOX_COLOUR).max() <= 30, (x, y, colour_at(x, y))
    inside = colour_at(mid_x, mid_y)
    assert np.abs(inside - BOX_COLOUR).max() > 30  # an outline, not a filled box
    page.close()
