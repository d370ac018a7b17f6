"""Time and memory of a 4x upscale, phase by phase: load, each sampling step, decode (CPU or GPU).

    .venv/bin/python tools/time_upscale.py --ckpt x4.safetensors --size 256 --steps 20 --dtype bfloat16
    .venv/bin/python tools/time_upscale.py --ckpt x4.safetensors --size 512 --steps 1 --no-decode   # one UNet step

What `python -m ldm upscale` runs (ldm.load, then ldm.pipeline.upscale_steps and decode with the script's
defaults: DDIM, scale 10, noise level 20), with a timestamp after every phase, because the command's
progress bar opens after the first step and a shared machine's times need taking apart: for each phase the
wall time, this process's CPU time (on a busy machine wall time grows, CPU time much less), the peak RSS so
far (VmHWM: a memory-mapped float32 checkpoint's pages count) and the load average. Random weights do as well
as real ones (tools/make_checkpoint.py --layout shared/reference/layouts/x4_upscaler.json). The last line
extrapolates to `--extrapolate` steps (default 20) from the median step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vm(field: str) -> float:
    """A /proc/self/status field in GB (VmHWM: peak RSS, VmRSS: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Clock:
    def __init__(self):
        self.phases: list[dict] = []
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def mark(self, name: str, device=None) -> dict:
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), cpu_seconds()
        phase = {"phase": name, "wall_s": round(wall - self.wall, 2), "cpu_s": round(cpu - self.cpu, 2),
                 "peak_rss_gb": round(vm("VmHWM"), 3), "rss_gb": round(vm("VmRSS"), 3),
                 "loadavg": " ".join(open("/proc/loadavg").read().split()[:3])}
        self.wall, self.cpu = wall, cpu
        self.phases.append(phase)
        print(json.dumps(phase), flush=True)
        return phase


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an x4 upscaler checkpoint")
    p.add_argument("--size", type=int, default=256, help="the low-res image side (output: 4x; default 256)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--extrapolate", type=int, default=20, help="steps of the extrapolated total (default 20)")
    p.add_argument("--config", help="the original YAML (default: beside the checkpoint, or detected)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: ldm's policy)")
    p.add_argument("--device", default=None)
    p.add_argument("--vae-tiling", action="store_true")
    p.add_argument("--no-decode", action="store_true", help="stop after sampling (to measure the UNet alone)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", type=Path, help="write the phases here")
    args = p.parse_args(argv)

    clock = Clock()
    import torch

    import ldm
    from ldm.pipeline import NumpyStartCodes, decode, make_generators, upscale_steps
    from ldm.upscaling import NOISE_LEVEL, SCALE
    from models.tiling import enable_vae_tiling

    clock.mark("import")
    model = ldm.load(args.ckpt, config=args.config, device=args.device, dtype=args.dtype)
    if args.vae_tiling:
        enable_vae_tiling(model.vae)
    device = model.placement.device
    clock.mark("load", device)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(7)) * 2 - 1
    x_T = NumpyStartCodes(args.seed, 1).draw((1, model.config.vae.embed_dim, args.size, args.size))
    steps = upscale_steps(model, image, "a photograph of a cat", noise_level=NOISE_LEVEL, steps=args.steps,
                          sampler="ddim", scale=SCALE, eta=0.0, generator=make_generators(args.seed, 1), x_T=x_T)
    latents, step_phases = None, []
    for i, step in enumerate(steps):  # the first includes the prompt's encoding and the low-res augmentation
        latents = step.x_next
        step_phases.append(clock.mark(f"step {i + 1}/{step.total}", device))
    if not args.no_decode:
        decode(model, latents)
        clock.mark("decode", device)
    walls = [s["wall_s"] for s in step_phases[1:]] or [s["wall_s"] for s in step_phases]
    cpus = [s["cpu_s"] for s in step_phases[1:]] or [s["cpu_s"] for s in step_phases]
    by = {ph["phase"]: ph for ph in clock.phases}
    extra = args.extrapolate - len(step_phases)
    total = sum(ph["wall_s"] for ph in clock.phases) + extra * statistics.median(walls)
    summary = {"dtype": str(model.placement.dtype).replace("torch.", ""), "device": str(device),
               "size": args.size, "out_size": args.size * model.config.vae.downsampling_factor,
               "steps_run": len(step_phases), "median_step_wall_s": statistics.median(walls),
               "median_step_cpu_s": statistics.median(cpus), "load_wall_s": by["load"]["wall_s"],
               "decode_wall_s": by["decode"]["wall_s"] if "decode" in by else None,
               "peak_rss_gb": vm("VmHWM"), "threads": torch.get_num_threads(), "vae_tiling": args.vae_tiling,
               f"total_wall_s_at_{args.extrapolate}_steps": round(total, 1), "cpus": os.cpu_count()}
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "phases": clock.phases, "args": vars(args)},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
