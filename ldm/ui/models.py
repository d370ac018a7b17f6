"""The checkpoints the UI offers (`--ckpt FILE`, every checkpoint under `--models-dir DIR`, or the built-in
model) and which tab each family fits. Families come from the files' headers: no weights are read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from weights import CheckpointError, detect_family, read_header

from ..builtin import CHECKPOINT as BUILTIN
from ..errors import UsageError
from ..special_options import KIND

EXTENSIONS = (".safetensors", ".ckpt")
# the family (or families) each tab needs, and what to tell a user whose checkpoint is another one
TAB_FAMILIES = {"txt2img": ("sd1", "sd2"), "img2img": ("sd1", "sd2"), "inpaint": ("sd1_inpaint", "sd2_inpaint"),
                "depth2img": ("sd2_depth",), "upscale": ("x4_upscaler",)}
NEEDS = {"txt2img": "a text-to-image checkpoint (SD 1.x or SD 2.x, e.g. v1-5-pruned-emaonly.safetensors)",
         "img2img": "a text-to-image checkpoint (SD 1.x or SD 2.x, e.g. v1-5-pruned-emaonly.safetensors)", **KIND}


def family_of(path: Path) -> Optional[str]:
    """The file's family, or None when it is no checkpoint this project reads (reference tensors, damaged files)."""
    try:
        return detect_family(read_header(path), source=path)
    except (CheckpointError, OSError, ValueError):
        return None


def find_checkpoints(ckpt: Optional[str], models_dir: Optional[str]) -> dict[str, str]:
    """{path as the PNGs will record it: family}; a UsageError when there is none."""
    if ckpt and models_dir:
        raise UsageError("--ckpt and --models-dir: pass one of them")
    if ckpt:
        path = BUILTIN if ckpt == "builtin" else Path(ckpt)
        if not path.is_file():
            raise UsageError(f"{ckpt}: no such checkpoint file")
        family = family_of(path)
        if family is None:
            raise UsageError(f"{ckpt}: is not a checkpoint this UI can load (python -m ldm inspect says why)")
        return {str(path): family}
    if models_dir:
        folder = Path(models_dir)
        if not folder.is_dir():
            raise UsageError(f"{models_dir}: no such folder; --models-dir takes a folder of checkpoints")
        files = sorted(Path(root) / name for root, _, names in os.walk(folder, followlinks=True)  # linked folders too
                       for name in names if name.endswith(EXTENSIONS))
        found = {str(p): f for p in files if (f := family_of(p)) is not None}
        if not found:
            raise UsageError(f"{models_dir}: holds no .ckpt or .safetensors checkpoint")
        return found
    if BUILTIN.is_file():
        return {str(BUILTIN): family_of(BUILTIN) or "sd1"}
    raise UsageError("no checkpoint: pass --ckpt FILE (e.g. v1-5-pruned-emaonly.safetensors) or --models-dir DIR")


def tab_note(tab: str, ckpt: str, family: str) -> str:
    """'' when the checkpoint fits the tab, else the line that says which checkpoint the tab needs."""
    if family in TAB_FAMILIES[tab]:
        return ""
    return f"**{Path(ckpt).name}** is a `{family}` checkpoint: this tab needs {NEEDS[tab]}."


def first_fitting(checkpoints: dict[str, str], tab: str) -> Optional[str]:
    return next((c for c, f in checkpoints.items() if f in TAB_FAMILIES[tab]), None)
