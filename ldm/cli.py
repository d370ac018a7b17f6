"""`python -m ldm <command>`: the command line. Errors a user can fix are one line and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import run_command

GENERATE = {"txt2img": "images from a text prompt (the original scripts/txt2img.py flags)",
            "img2img": "variations of an input image (the original scripts/img2img.py flags)",
            "steps": "watch an image form: a filmstrip and a GIF of the predicted x0 (txt2img flags + --every; "
                     "`steps inpaint|depth2img|upscale ...` for those)"}
SPECIAL = {"inpaint": "repaint the masked part of an image (SD 1.5 / SD 2 inpainting checkpoints)",
           "depth2img": "re-render an image keeping its depth (SD 2 depth checkpoint)",
           "upscale": "upscale an image 4x (x4 upscaler checkpoint)"}
UI = {"ui": "the browser UI: every command in tabs, a Steps view, an API (pip install -e '.[ui]' for Gradio)"}
TOOLS = {"batch": "many jobs from a JSONL file, resumable, locally or on a Ray cluster (pip install -e '.[ray]')",
         "watermark": "read the invisible watermark of PNG files (pip install -e '.[watermark]')"}


def _inspect(args) -> int:
    from .inspect import format_summary, summarize

    info = summarize(Path(args.ckpt), load=args.load, config=args.config, ema=args.ema)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what a checkpoint holds: family, dtypes, parameters, EMA, extra keys")
    p.add_argument("ckpt", help=".ckpt or .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--load", action="store_true", help="also build and strictly load the networks; "
                                                       "report load seconds and peak RSS")
    p.add_argument("--config", default=None, help="original YAML config (with --load)")
    p.add_argument("--ema", action="store_true", help="load the EMA UNet weights (with --load)")
    p.set_defaults(run=_inspect)
    for name, text in {**GENERATE, **SPECIAL, **UI, **TOOLS}.items():  # listed for --help; their own modules parse their flags
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "steps":
        from .filmstrip import main as steps
        return steps(argv[1:])
    if argv and argv[0] in UI:
        from .ui.serve import main as ui  # the only import of the ui package (and of gradio)
        return ui(argv[1:])
    if argv and argv[0] == "batch":
        from .batch import main as batch  # Ray is imported there, and only with --ray
        return batch(argv[1:])
    if argv and argv[0] == "watermark":
        from .watermark import main as watermark  # invisible-watermark is imported there
        return watermark(argv[1:])
    if argv and argv[0] in SPECIAL:
        from .special_run import main as special  # the same code as tools/inpaint.py, depth2img.py, upscale.py
        return special(argv[0], argv[1:])
    if argv and argv[0] in GENERATE:
        from .generate import main as generate  # the same code as tools/txt2img.py and tools/img2img.py
        return generate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.run(args))
