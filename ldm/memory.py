"""Will a run fit in memory? A size ceiling checked before the first step, not a 40 GB traceback later.

The peak of a run is the larger of two activation peaks (the weights are already loaded when this runs,
so the free memory read here excludes them):
- the UNet on the guidance batch (2 n samples) at latent size: measured as 25-33 floats per latent pixel,
  per sample and per model channel, growing with the side (SD 1: 25.5 at 32x32, 29.6 at 64x64, 33.0 at
  96x96; SD 2: 20.4 at 64x64; CPU float32, one forward); the x4 upscaler, with no attention at its top
  level, 11.2, 17.1 and 13.9 at 64, 128 and 256 (its latent is the low-res image);
- the VAE decoding (or encoding) n images at full size: ~5.4 floats per image pixel per base channel
  (SD 1 at 512x512; 5.0 at 768x768), the 256/128-channel layers at full resolution. Tiled (--vae-tiling) it only
  ever holds one tile's worth.
The constants below round those measurements up (tools/measure_memory.py repeats them); this is an
estimate meant to stop runs that cannot finish, so it errs on the generous side of "fits".
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from models.config import ModelConfig

UNET_FLOATS = 24  # per latent pixel, per sample in the guidance batch, per UNet model channel, plus the term below
UNET_FLOATS_NO_TOP_ATTENTION = 18  # the same for a UNet without attention at its top level (x4 upscaler)
VAE_FLOATS = 6  # per image pixel, per image, per VAE base channel
OUTPUT_FLOATS = 9  # the decoded float image, its tile blend weights and the uint8 copy, per pixel


@dataclass(frozen=True)
class Need:
    unet: int  # bytes
    vae: int

    @property
    def peak(self) -> int:
        return max(self.unet, self.vae)


def estimate(cfg: ModelConfig, n: int, height: int, width: int, *, unet_itemsize: int, vae_itemsize: int,
             vae_tile: Optional[int] = None) -> Need:
    """Peak activation bytes of sampling and of decoding `n` images of height x width."""
    f = cfg.vae.downsampling_factor
    latent = (height // f) * (width // f)
    if 1 in cfg.unet.attention_resolutions:  # a transformer at full latent size (SD): grows with the side
        floats = UNET_FLOATS + math.sqrt(latent) / 8
    else:  # the x4 upscaler: ResBlocks only at full size
        floats = UNET_FLOATS_NO_TOP_ATTENTION
    unet = int(2 * n * latent * floats * cfg.unet.model_channels * unet_itemsize)
    pixels = height * width
    decoded = pixels if vae_tile is None else min(pixels, (vae_tile * f) ** 2)
    vae = n * (decoded * VAE_FLOATS * cfg.vae.ch * vae_itemsize + pixels * OUTPUT_FLOATS * 4)
    return Need(unet, vae)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory a run can still allocate on `device`, or None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        limit = getattr(torch.mps, "recommended_max_memory", None)
        return None if limit is None else limit() - torch.mps.driver_allocated_memory()
    try:  # Linux: what the kernel says can be had without swapping, plus the swap itself (slow, but fits)
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GB"


def largest_fitting(cfg: ModelConfig, n: int, height: int, width: int, budget: int, **kwargs) -> tuple[int, int]:
    """The largest size (multiples of 64) at most height x width whose estimate fits `budget`: the longer
    side shrinks first, so a strip stays as tall as asked, then both sides together."""
    h, w = height // 64 * 64, width // 64 * 64
    while min(h, w) >= 64 and estimate(cfg, n, h, w, **kwargs).peak > budget:
        # a big step while far off (area scales the estimate), then 64 at a time
        over = estimate(cfg, n, h, w, **kwargs).peak / budget
        step = max(64, int((1 - 1 / over) * max(h, w)) // 2 // 64 * 64) if over > 2 else 64
        if w > h:
            w = max(h, w - step)
        elif h > w:
            h = max(w, h - step)
        else:
            h, w = h - 64, w - 64
    return h, w


def refusal(cfg: ModelConfig, n: int, height: int, width: int, budget: int, device: torch.device, *,
            unet_itemsize: int, vae_itemsize: int, vae_tile: Optional[int]) -> Optional[str]:
    """None when the run fits in `budget` bytes, else one line: what it needs, the largest size that fits,
    and the flags that would help."""
    sizes = dict(unet_itemsize=unet_itemsize, vae_itemsize=vae_itemsize)
    need = estimate(cfg, n, height, width, vae_tile=vae_tile, **sizes)
    if need.peak <= budget:
        return None
    part = "the UNet" if need.unet >= need.vae else "the VAE decode"
    line = (f"--H {height} --W {width} with {n} sample(s) per batch needs about {_gib(need.peak)} for {part}; "
            f"{device.type} has {_gib(budget)} free")
    h, w = largest_fitting(cfg, n, height, width, budget, vae_tile=vae_tile, **sizes)
    hints = [f"--H {h} --W {w} fits"] if h >= 64 and w >= 64 else []
    if n > 1 and estimate(cfg, 1, height, width, vae_tile=vae_tile, **sizes).peak <= budget:
        hints.append("--n_samples 1 fits")
    if vae_tile is None and estimate(cfg, n, height, width, vae_tile=64, **sizes).peak <= budget:
        hints.append("--vae-tiling would make this size fit")
    elif vae_tile is None and need.vae > budget:
        hints.append("--vae-tiling bounds the decode")
    if device.type != "cpu":
        hints.append("--lowvram keeps the weights off the device between stages")
    return f"{line}: {'; '.join(hints) or 'use a smaller size'}"
