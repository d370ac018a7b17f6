"""Measure the activation peaks that ldm/memory.py estimates, on full-size random networks (CPU, float32).

Each case runs in a fresh process: the network is built and warmed up at a tiny size, then ru_maxrss
growth over one forward (UNet, guidance batch of 2) or one decode is the measured peak.

    python tools/measure_memory.py                     # SD 1 UNet at 32/64 latent, VAE at 256/512
    python tools/measure_memory.py unet sd2 2 64       # one case: what, family, batch, size
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [("unet", "sd1", 2, 32), ("unet", "sd1", 2, 64), ("unet", "sd2", 2, 64), ("vae", "sd1", 1, 256),
         ("vae", "sd1", 1, 512)]


def measure(what: str, family: str, batch: int, size: int) -> dict:
    import gc

    import torch

    from ldm.memory import estimate
    from models.config import PRESETS
    from models.unet import UNetModel
    from models.vae import AutoencoderKL

    def rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    cfg = PRESETS[family]
    with torch.no_grad():
        if what == "unet":  # size is the latent side; the guidance batch is `batch`
            net = UNetModel(cfg.unet).eval()
            x, t = torch.randn(batch, cfg.unet.in_channels, size, size), torch.full((batch,), 500)
            c = torch.randn(batch, 77, cfg.unet.context_dim)
            y = torch.full((batch,), 20) if cfg.unet.num_classes else None  # the x4 upscaler's noise level
            net(x[..., :8, :8], t, c, y)
            gc.collect()
            base = rss()
            net(x, t, c, y)
            f = cfg.vae.downsampling_factor
            est = estimate(cfg, batch // 2, size * f, size * f, unet_itemsize=4, vae_itemsize=4).unet
        else:  # size is the image side
            net = AutoencoderKL(cfg.vae).eval()
            z = torch.randn(batch, 4, size // 8, size // 8)
            net.decode(z[..., :8, :8])
            gc.collect()
            base = rss()
            net.decode(z)
            est = estimate(cfg, batch, size, size, unet_itemsize=4, vae_itemsize=4).vae
    peak = rss() - base
    return {"what": what, "family": family, "batch": batch, "size": size, "measured_MB": round(peak / 2**20),
            "estimated_MB": round(est / 2**20), "estimate/measured": round(est / peak, 2)}


def main(argv: list[str]) -> None:
    if argv:
        print(json.dumps(measure(argv[0], argv[1], int(argv[2]), int(argv[3]))))
        return
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, *map(str, case)], capture_output=True, text=True,
                             cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        print(out.stdout.strip() or out.stderr.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
