"""The inpaint tab's painted mask: gr.ImageEditor's background is the image, whatever is painted on its
layers (any colour, any opacity) is the part to repaint. Both are written as PNGs into the output folder's
inputs/, named by their contents, and handed to the command as --init-img and --mask."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UsageError


def _stash_png(image: Image.Image, outdir: Path) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = Path(outdir) / "inputs" / (hashlib.sha256(data).hexdigest()[:16] + ".png")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(path)


def split_editor(value, outdir: Path) -> tuple[str, str]:
    """(init image path, mask path) from an ImageEditor value of PIL images."""
    background = (value or {}).get("background")
    if background is None:
        raise UsageError("Upload an image to repaint, then paint over the part to repaint")
    painted = np.zeros(background.size[::-1], dtype=bool)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        a = np.asarray(layer.convert("RGBA").resize(background.size))[..., 3]
        painted |= a > 0
    if not painted.any():
        raise UsageError("Paint over the part of the image to repaint (the mask is empty)")
    mask = Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), mode="L")
    return _stash_png(background.convert("RGB"), outdir), _stash_png(mask, outdir)
