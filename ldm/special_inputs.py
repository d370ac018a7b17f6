"""The special commands' input files, read before any weights: the inpainting mask (a file, or the init
image's alpha), and depth2img's depth map. Each failure is one ImageError naming the file.

Masks follow `make_batch_sd` of the inpainting scripts: the L image / 255, then >= 0.5 is 1 (repaint);
`--mask-from-alpha` takes transparency as the part to repaint (alpha <= 127), the convention of image editors
that erase what should be redone. A depth map is the depth model's raw output saved as a grayscale PNG,
8 or 16 bit, larger = nearer (MiDaS's inverse depth): only its relative values matter, depth2img normalises it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .images import ImageError, _as_8bit, _open

DEPTH_MODES = {"L": 8, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16}


@dataclass(frozen=True)
class InputFile:
    tensor: torch.Tensor        # mask (1, 1, H, W) in [0, 1]; depth (1, 1, H', W') raw float32
    note: Optional[str]         # how it was adapted (None: it was not)
    sha256: Optional[str]       # of the file, for the PNG metadata


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _decoded(im: Image.Image, path: Path, what: str) -> Image.Image:
    try:
        im.load()
        return im
    except OSError as e:  # truncated or corrupt data shows up only when the pixels are decoded
        raise ImageError(f"{path}: cannot be decoded as the {what} ({e}); re-save it as a PNG") from None


def load_mask(path, size: tuple[int, int]) -> InputFile:
    """The mask file as (1, 1, H, W) in [0, 1] at `size` (W, H): resized (bilinear) with a note when it differs,
    binarised later (`inpainting.binarize`)."""
    path = Path(path)
    with _open(path, "mask") as im:
        im = _decoded(im, path, "mask")
        im8, converted = _as_8bit(im, path)
        mask = im8.convert("L")
    notes = [converted] if converted else []
    if mask.size != tuple(size):
        notes.append(f"resized the mask {path.name} from {mask.size[0]}x{mask.size[1]} to the image's "
                     f"{size[0]}x{size[1]}")
        mask = mask.resize(tuple(size), resample=Image.BILINEAR)
    array = np.array(mask).astype(np.float32) / 255.0
    return InputFile(torch.from_numpy(array)[None, None], "; ".join(notes) or None, sha256(path))


def mask_from_alpha(path, size: tuple[int, int]) -> InputFile:
    """The init image's transparency as the mask: 1 - alpha / 255, so fully transparent pixels are 1 (repaint)
    and the >= 0.5 rule repaints where alpha <= 127."""
    path = Path(path)
    with _open(path, "init image") as im:
        im = _decoded(im, path, "init image")
        if not (im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info):
            raise ImageError(f"{path}: has no alpha channel ({im.mode}); --mask-from-alpha needs a PNG with "
                             "transparency where to repaint, or pass --mask")
        alpha = im.convert("RGBA").getchannel("A")
    note = None
    if alpha.size != tuple(size):
        alpha = alpha.resize(tuple(size), resample=Image.BILINEAR)
        note = f"resized the alpha mask with the image to {size[0]}x{size[1]}"
    array = 1.0 - np.array(alpha).astype(np.float32) / 255.0
    if not (array >= 0.5).any():
        raise ImageError(f"{path}: no pixel is transparent enough to repaint (alpha <= 127); nothing to inpaint")
    return InputFile(torch.from_numpy(array)[None, None], note, None)


def load_depth_map(path) -> InputFile:
    """An 8- or 16-bit grayscale PNG as the raw depth (1, 1, H', W') float32, values as stored."""
    path = Path(path)
    with _open(path, "depth map") as im:
        bits = DEPTH_MODES.get(im.mode)
        if im.mode == "I" and im.format == "PNG":  # Pillow before 10 opened 16-bit grayscale PNGs as "I"
            bits = 16
        if bits is None:
            raise ImageError(f"{path}: is a {im.mode} image; --depth-map takes an 8- or 16-bit grayscale PNG of "
                             "the depth model's output (larger = nearer)")
        array = np.array(_decoded(im, path, "depth map")).astype(np.float32)
    if array.ndim != 2 or not np.isfinite(array).all():
        raise ImageError(f"{path}: not a single-channel depth map; save it as an 8- or 16-bit grayscale PNG")
    if array.min() == array.max():
        raise ImageError(f"{path}: holds one value everywhere ({array.min():g}); a depth map needs near and far")
    return InputFile(torch.from_numpy(array)[None, None], None, sha256(path))
