"""The original scripts' invisible watermark (`--watermark`), and `python -m ldm watermark FILE...` to read it.

The CompVis and Stability scripts mark every sample and grid with the invisible-watermark package's DWT-DCT
method, the text "StableDiffusionV1" (SD 1.x) or "SDV2" (SD 2.x), exactly as their `put_watermark`: the RGB
image converted to BGR for OpenCV, encoded, and turned back by reversing the channels. The package is an
optional extra, imported only here and only when a watermark is written or read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UsageError, run_command

TEXTS = ("StableDiffusionV1", "SDV2")
MIN_PIXELS = 256 * 256  # invisible-watermark refuses smaller images
INSTALL = "pip install -e '.[watermark]' (the invisible-watermark package)"


def text_for(family: str) -> str:
    """The text the original scripts of this family write: SD 1.x's, or SD 2.x's (the x4 upscaler's too)."""
    return TEXTS[0] if family.startswith("sd1") else TEXTS[1]


def _package():
    try:
        import cv2
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        raise UsageError(f"the invisible watermark needs invisible-watermark: {INSTALL}") from None
    return cv2, WatermarkEncoder, WatermarkDecoder


def check(width: int, height: int) -> None:
    """--watermark's checks before any weights are read: the package is there, the images are large enough."""
    _package()
    if width * height < MIN_PIXELS:
        raise UsageError(f"--watermark: the images are {width}x{height}; invisible-watermark needs at least "
                         f"{MIN_PIXELS} pixels (256x256): make them larger or drop --watermark")


class Watermarker:
    """`mark(rgb)`: an (H, W, 3) uint8 RGB image with `text` in it, as the original `put_watermark`."""

    def __init__(self, text: str):
        self.cv2, encoder, _ = _package()
        self.text = text
        self.encoder = encoder()
        self.encoder.set_watermark("bytes", text.encode("utf-8"))

    def mark(self, rgb: np.ndarray) -> np.ndarray:
        bgr = self.cv2.cvtColor(np.asarray(rgb), self.cv2.COLOR_RGB2BGR)
        return np.ascontiguousarray(self.encoder.encode(bgr, "dwtDct")[:, :, ::-1])


def read(rgb: np.ndarray, texts: tuple[str, ...] = TEXTS) -> Optional[str]:
    """The first of `texts` that the image's DWT-DCT watermark spells, or None."""
    cv2, _, decoder = _package()
    bgr = cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR)
    for text in texts:
        bits = len(text.encode("utf-8")) * 8
        if decoder("bytes", bits).decode(bgr, "dwtDct") == text.encode("utf-8"):
            return text
    return None


def _read_file(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{path}: cannot be read as an image ({type(e).__name__})") from None
    if rgb.shape[0] * rgb.shape[1] < MIN_PIXELS:
        raise UsageError(f"{path}: is {rgb.shape[1]}x{rgb.shape[0]}; a watermark needs at least 256x256 pixels")
    return rgb


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, as every command's
        raise UsageError(f"{message} (see --help)")


def main(argv=None) -> int:
    """Print each file's watermark; exit 0 when every file has one, 1 when some has none, 2 on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog="python -m ldm watermark",
                                     description="read the original scripts' invisible watermark of images")
    parser.add_argument("files", nargs="+", help="PNG (or other) images")
    parser.add_argument("--text", action="append", default=None,
                        help=f"a watermark text to look for (default: {' and '.join(TEXTS)}); may be repeated")

    def run() -> int:
        args = parser.parse_args(argv)
        texts = tuple(args.text) if args.text else TEXTS
        _package()
        found = 0
        for name in args.files:
            text = read(_read_file(Path(name)), texts)
            found += text is not None
            print(f"{name}: {text}" if text else f"{name}: no watermark ({', '.join(texts)} not found)")
        return 0 if found == len(args.files) else 1

    return run_command(run)
