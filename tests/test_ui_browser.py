"""The page in headless Chromium (Playwright driving Debian's `chromium`): type a prompt, press Generate, an
image appears and is saved with its parameters; the Steps slider changes the picture; Cancel stops a long run.
Skipped where playwright or a chromium binary is missing (pip install -e '.[browser]'; apt-get install chromium;
or LDM_CHROMIUM=/path/to/chrome)."""
from __future__ import annotations

import argparse
import os
import shutil
import socket

import pytest

from conftest import FIXTURES

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("LDM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium binary (apt-get install chromium, or set LDM_CHROMIUM)", allow_module_level=True)


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    from ldm.ui.serve import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outdir = tmp_path_factory.mktemp("ui-browser")
    args = argparse.Namespace(ckpt=str(FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"), models_dir=None, outdir=str(outdir),
                              host="127.0.0.1", port=port, listen=False, device="cpu")
    demo, url = start(args, block=False)
    yield url, outdir
    demo.close()


@pytest.fixture
def browser_page(page_url):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.goto(page_url[0])
        yield page, page_url[1]
        browser.close()


def _fill_number(page, label: str, value) -> None:
    page.get_by_label(label, exact=True).first.fill(str(value))


def test_generate_shows_and_saves_an_image(browser_page):
    page, outdir = browser_page
    page.get_by_label("Prompt").first.fill("a red circle at the top left")
    for label, value in (("Steps", 4), ("Seed (-1: random)", 1), ("Width", 64), ("Height", 64)):
        _fill_number(page, label, value)
    page.locator("#txt2img-generate").click()
    page.locator("#txt2img-gallery img").first.wait_for(timeout=60_000)
    saved = list((outdir / "txt2img-samples" / "samples").glob("*.png"))
    assert saved
    from ldm.images import read_parameters
    assert "Seed: 1" in read_parameters(saved[0])


def test_steps_slider_changes_the_picture(browser_page):
    page, _ = browser_page
    page.get_by_role("tab", name="Steps").click()
    page.locator("#steps-run").click()
    page.locator("#steps-x0 img").wait_for(timeout=60_000)
    last = page.locator("#steps-x0 img").get_attribute("src")
    slider = page.locator("#steps-slider input[type=number]")
    slider.fill("1")
    slider.press("Enter")
    page.wait_for_function("(src) => document.querySelector('#steps-x0 img').src !== src", arg=last, timeout=30_000)


def test_cancel_stops_a_long_run(browser_page):
    page, _ = browser_page
    page.get_by_label("Prompt").first.fill("a blue square")
    for label, value in (("Steps", 1000), ("Width", 64), ("Height", 64)):
        _fill_number(page, label, value)
    page.locator("#txt2img-generate").click()
    page.locator("#txt2img-preview img").wait_for(timeout=60_000)
    page.locator("#cancel").click()
    page.get_by_text("Cancelled at step").first.wait_for(timeout=10_000)
