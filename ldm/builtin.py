"""The built-in model: a tiny latent diffusion model in the official SD 1.x format, trained by
tools/train_tiny.py on pictures of one coloured shape ("a red circle at the top left", "a blue triangle in the
center on a white background") and shipped in the package (weights/builtin/), so that a command with no
checkpoint draws what it is asked on any machine, with nothing to download.

It is an ordinary checkpoint plus its YAML: nothing about it is special-cased in loading. What is special is
only where it is used: `--ckpt builtin` (or `ldm.load("builtin")`) names it, and a command without --ckpt
(or `ldm.load()`) takes it when the original scripts' default checkpoint is not there.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import weights

NAME = "builtin"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"  # the original scripts' default --ckpt
FOLDER = Path(weights.__file__).resolve().parent / "builtin"
CHECKPOINT = FOLDER / "tiny.safetensors"
# The guidance scale a command uses with the built-in model when --scale is not given (the model is evaluated
# at it: tools/shapes.py). SD's 7.5 pushes its colours past the named one along the autoencoder's latent colour
# line (orange drawn yellow): on 150 captions (DDIM, 20 steps) colour right in 97% at 4 against 85% at 7.5.
SCALE = 4.0
GRAMMAR = ('"a {colour} {shape} {place}" or "... on a {background} background": colours red, green, blue, '
           "yellow, white, purple, orange; shapes circle, square, triangle; places at the top left, at the top "
           "right, at the bottom left, at the bottom right, in the center; backgrounds black, gray, white")


@lru_cache(maxsize=1)
def native_size() -> int:
    """The side in pixels the built-in model was trained at (its YAML's VAE resolution)."""
    from models.config import from_yaml

    return from_yaml(CHECKPOINT.with_suffix(".yaml")).vae.resolution


def is_builtin(path: Union[str, Path, None]) -> bool:
    return path is not None and (str(path) == NAME or Path(path).resolve() == CHECKPOINT)


def resolve_checkpoint(ckpt: Union[str, Path, None]) -> tuple[Path, Optional[str]]:
    """(the checkpoint file, a one-line note or None): `None` is the original default path when it exists
    (or the built-in model does not), else the built-in model (with a note that says so); "builtin" is the
    built-in model; anything else is that path."""
    if ckpt is None:
        if Path(DEFAULT_CKPT).is_file() or not CHECKPOINT.is_file():  # (a checkout without the shipped files)
            return Path(DEFAULT_CKPT), None
        side = native_size()
        return CHECKPOINT, (f"no checkpoint at {DEFAULT_CKPT}: using the built-in {side}x{side} model of coloured "
                            "shapes (prompts like \"a red circle at the top left\"); --ckpt FILE takes another")
    if str(ckpt) == NAME:
        return CHECKPOINT, None
    return Path(ckpt), None
