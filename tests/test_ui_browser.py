"""The page in headless Chromium (Playwright driving Debian's `chromium`, never a downloaded browser), served
over the tiny SD 1 checkpoint: type a prompt, press Generate, the image appears and is the file saved with its
parameters; the Steps slider changes the picture; Cancel stops a long run within one step; bad input is a
message in the page and the server keeps serving.

Opt-in: skipped where Playwright or a Chromium binary is missing. To run them:
    apt-get install chromium            # or LDM_CHROMIUM=/path/to/chrome
    pip install -e '.[browser]'
    .venv/bin/python -m pytest -q tests/test_ui_browser.py
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
from pathlib import Path

import pytest

from conftest import FIXTURES

HOW = "pip install -e '.[browser]' and apt-get install chromium (or set LDM_CHROMIUM=/path/to/chrome)"
pytest.importorskip("gradio", reason="the UI needs Gradio: pip install -e '.[ui]'")
playwright_api = pytest.importorskip("playwright.sync_api", reason=f"no Playwright: {HOW}")
CHROMIUM = os.environ.get("LDM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip(f"no chromium binary: {HOW}", allow_module_level=True)

SLOW = 120_000  # ms: a generation on the tiny model, on a busy 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, outdir): the UI over the tiny SD 1 checkpoint, served from this process on one thread."""
    import torch

    from ldm.ui.serve import start

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    env = os.environ.get("GRADIO_TEMP_DIR")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outdir = tmp_path_factory.mktemp("ui-browser")
    args = argparse.Namespace(ckpt=str(FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"), models_dir=None, outdir=str(outdir),
                              host="127.0.0.1", port=port, listen=False, device="cpu")
    demo, url = start(args, block=False)
    yield url, outdir
    demo.close()
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = env


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh tab on the page, loaded."""
    tab = browser.new_page(viewport={"width": 1200, "height": 1000})
    tab.goto(server[0])
    tab.locator("#txt2img-generate").wait_for()
    yield tab
    tab.close()


def fill(page, elem_id: str, value) -> None:
    """Type into the field whose elem_id the page gives it (a Textbox's textarea, a Number's input)."""
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(str(value))


def message(page, text: str) -> str:
    """The page's message (Gradio's toast) holding `text`, waited for; its whole text."""
    toast = page.locator(".toast-body").filter(has_text=text).first
    toast.wait_for(timeout=SLOW)
    return toast.inner_text()


def image_bytes(page, img) -> bytes:
    """The bytes the browser was served for an <img>."""
    return page.request.get(img.get_attribute("src")).body()


def generate_small(page, prompt: str = "a red circle at the top left", **settings) -> None:
    page.get_by_role("tab", name="txt2img", exact=True).click()
    fill(page, "txt2img-prompt", prompt)
    for name, value in {"steps": 1, "seed": 1, "width": 64, "height": 64, "n_samples": 1, **settings}.items():
        fill(page, f"txt2img-{name}", value)
    page.locator("#txt2img-generate").click()


def samples(outdir: Path) -> set[Path]:
    return set((outdir / "txt2img-samples" / "samples").glob("*.png"))


def test_generate_shows_and_saves_an_image_with_its_parameters(page, server):
    from ldm.images import read_parameters

    _, outdir = server
    before = samples(outdir)
    generate_small(page, "a red circle at the top left", steps=4, seed=1, sampler="Euler a")
    shown = page.locator("#txt2img-gallery img").first
    shown.wait_for(timeout=SLOW)
    new = samples(outdir) - before
    assert len(new) == 1
    saved = new.pop()
    parameters = read_parameters(saved)
    assert parameters.startswith("a red circle at the top left\n")
    assert "Steps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x64" in parameters
    assert parameters in page.locator("#txt2img-info textarea").input_value()
    assert image_bytes(page, shown) == saved.read_bytes(), "the page shows the saved file itself"


def test_steps_slider_changes_the_picture(page):
    page.get_by_role("tab", name="Steps", exact=True).click()
    for name, value in (("prompt", "a red circle at the top left"), ("steps", 4), ("width", 64), ("height", 64)):
        fill(page, f"steps-{name}", value)
    page.locator("#steps-run").click()
    where = page.locator("#steps-where")
    where.filter(has_text="step 4 of 4").wait_for(timeout=SLOW)
    last = {k: image_bytes(page, page.locator(f"#steps-{k} img")) for k in ("xt", "x0", "eps")}
    slider = page.locator("#steps-slider input[type=number]")
    slider.fill("1")
    slider.press("Enter")
    where.filter(has_text="step 1 of 4").wait_for(timeout=SLOW)
    assert re.search(r"t = \d+", where.inner_text())
    first = {k: image_bytes(page, page.locator(f"#steps-{k} img")) for k in ("xt", "x0", "eps")}
    assert all(first[k] != last[k] for k in first), "x_t, the predicted x0 and ε all differ between steps 1 and 4"


def test_cancel_stops_a_long_run_within_one_step(page, server):
    _, outdir = server
    before = samples(outdir)
    generate_small(page, "a blue square", steps=200, every=1)
    page.locator("#txt2img-preview img").wait_for(timeout=SLOW)  # running: a preview has come
    page.locator("#cancel").click()
    text = message(page, "Cancelled at step")
    stopped, total, pressed = map(int, re.search(r"step (\d+) of (\d+) of batch 1 \(Cancel came after step (\d+)\)",
                                                 text).groups())
    assert total == 200 and pressed >= 1 and stopped - pressed <= 1, text
    assert samples(outdir) == before, "a cancelled batch saves nothing"


@pytest.mark.parametrize("case, expected", [
    ("empty prompt", "Type a prompt"),
    ("no image", "Upload an image to start from"),
    ("text named .png", "fake.png is not an image this page can read"),
    ("text file", "Invalid file type"),
    ("width 63", "--W 63 is not a multiple of 2"),
    ("huge batch", "at most 16"),
])
def test_bad_input_is_a_message_in_the_page_and_the_server_keeps_serving(page, server, tmp_path, case, expected):
    _, outdir = server
    if case in ("empty prompt", "width 63", "huge batch"):
        settings = {"width 63": dict(width=63), "huge batch": dict(n_samples=1000)}.get(case, {})
        generate_small(page, "" if case == "empty prompt" else "a red circle", **settings)
    else:
        page.get_by_role("tab", name="img2img", exact=True).click()
        if case != "no image":
            upload = tmp_path / ("fake.png" if case == "text named .png" else "notes.txt")
            upload.write_text("not an image")
            page.locator("#img2img-init_image input[type=file]").set_input_files(str(upload))
        page.locator("#img2img-generate").click()
    message(page, expected)
    before = samples(outdir)
    generate_small(page)
    page.locator("#txt2img-gallery img").first.wait_for(timeout=SLOW)
    assert len(samples(outdir) - before) == 1, "the next run is served and saved"


@pytest.mark.parametrize("tab, needs", [("inpaint", "an inpainting checkpoint"), ("upscale", "the x4 upscaler")])
def test_a_tab_the_checkpoint_does_not_fit_says_which_it_needs(page, tab, needs):
    page.get_by_role("tab", name=tab, exact=True).click()
    page.get_by_text(f"sd1_tiny.ckpt is a sd1 checkpoint: this tab needs {needs}").filter(visible=True).wait_for()


def test_png_info_fills_txt2img_and_send_to_img2img_takes_the_image(page, server, tmp_path):
    from ldm.images import a1111_parameters
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    text = a1111_parameters("a green square, in the center", "blurry", 7, "DPM++ 2M Karras", 6.5, 1234, 64, 48,
                            "abc", "m", {})
    info = PngInfo()
    info.add_text("parameters", text)
    dropped = tmp_path / "made-elsewhere.png"
    Image.new("RGB", (64, 48), (0, 128, 0)).save(dropped, pnginfo=info)
    page.get_by_role("tab", name="PNG info", exact=True).click()
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(dropped))
    page.wait_for_function("() => document.querySelector('#pnginfo-text textarea').value.includes('Seed: 1234')",
                           timeout=SLOW)
    page.get_by_role("button", name="Send to txt2img").click()
    prompt = page.locator("#txt2img-prompt textarea")
    prompt.filter(visible=True).wait_for()
    page.wait_for_function("() => document.querySelector('#txt2img-seed input').value === '1234'", timeout=SLOW)
    got = {k: page.locator(f"#txt2img-{k} textarea, #txt2img-{k} input").first.input_value()
           for k in ("prompt", "negative_prompt", "steps", "seed", "width", "height", "sampler")}
    assert got == {"prompt": "a green square, in the center", "negative_prompt": "blurry", "steps": "7",
                   "seed": "1234", "width": "64", "height": "48", "sampler": "DPM++ 2M Karras"}

    _, outdir = server
    before = samples(outdir)
    generate_small(page, "a red circle at the top left", seed=5)
    page.locator("#txt2img-gallery img").first.wait_for(timeout=SLOW)
    (saved,) = samples(outdir) - before
    page.locator("#txt2img-sends button", has_text="Send to img2img").click()
    sent = page.locator("#img2img-init_image img")
    sent.wait_for(timeout=SLOW)
    assert image_bytes(page, sent) == saved.read_bytes(), "img2img's input is the saved image"
