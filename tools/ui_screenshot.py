"""The README's screenshots of the browser UI: docs/ui.png (txt2img with a generated image) and
docs/ui_steps.png (the Steps tab after a run), taken by Playwright driving Debian's chromium.

    apt-get install chromium && pip install -e '.[ui,browser]'
    .venv/bin/python tools/ui_screenshot.py                      # the built-in model (weights/builtin/)
    .venv/bin/python tools/ui_screenshot.py --ckpt ../shared/reference/fixtures/sd1_tiny/sd1_tiny.ckpt --size 64

The server runs in this process on the CPU, over a throwaway output folder. The PNGs are cut down to a
256-colour palette so that they stay small in the repository (< 300 KB).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SLOW = 600_000  # ms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shrink(path: Path) -> int:
    """Rewrite the screenshot as a palette PNG (screenshots have few colours); its size in bytes."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    return path.stat().st_size


def fill(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(str(value))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="builtin", help="checkpoint to serve (default: the built-in model)")
    p.add_argument("--prompt", default="a red circle at the top left")
    p.add_argument("--size", type=int, default=None, help="width and height (default: the page's default)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sampler", default="Euler a")
    p.add_argument("--width", type=int, default=1200, help="the browser window's width in pixels")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where ui.png and ui_steps.png go")
    p.add_argument("--chromium", default=os.environ.get("LDM_CHROMIUM") or shutil.which("chromium"))
    args = p.parse_args(argv)
    if not args.chromium:
        p.error("no chromium: apt-get install chromium, or pass --chromium PATH")
    import torch
    from playwright.sync_api import sync_playwright

    from ldm.ui.serve import start

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as outdir:
        serve = argparse.Namespace(ckpt=args.ckpt, models_dir=None, outdir=outdir, host="127.0.0.1",
                                   port=free_port(), listen=False, device="cpu")
        demo, url = start(serve, block=False)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True)
                page = browser.new_page(viewport={"width": args.width, "height": 900})
                page.goto(url)
                page.locator("#txt2img-generate").wait_for()
                settings = dict(prompt=args.prompt, steps=args.steps, seed=args.seed, sampler=args.sampler)
                if args.size:
                    settings.update(width=args.size, height=args.size)
                for name, value in settings.items():
                    fill(page, f"txt2img-{name}", value)
                page.locator("#txt2img-generate").click()
                page.locator("#txt2img-gallery img").first.wait_for(timeout=SLOW)
                page.wait_for_timeout(500)  # the gallery's fade-in
                page.screenshot(path=docs / "ui.png", full_page=True)
                page.get_by_role("tab", name="Steps", exact=True).click()
                for name, value in settings.items():
                    if name != "sampler":
                        fill(page, f"steps-{name}", value)
                page.locator("#steps-run").click()
                page.locator("#steps-where").filter(has_text=f"step {args.steps} of {args.steps}").wait_for(
                    timeout=SLOW)
                slider = page.locator("#steps-slider input[type=number]")
                slider.fill(str(max(1, args.steps * 2 // 5)))  # a step where the picture is still forming
                slider.press("Enter")
                page.locator("#steps-where").filter(has_text=f"step {max(1, args.steps * 2 // 5)} of").wait_for(
                    timeout=SLOW)
                page.wait_for_timeout(500)
                page.screenshot(path=docs / "ui_steps.png", full_page=True)
                browser.close()
        finally:
            demo.close()
    for name in ("ui.png", "ui_steps.png"):
        print(f"{docs / name}: {shrink(docs / name) // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
