"""Checks that need an accelerator (CUDA or MPS); run by hand, never by the test suite.

    python tools/device_check.py --shared ../shared [--device cuda] [--out report.json]

1. Seeds are device-independent: the tiny reference models' whole txt2img, run on the accelerator in
   float32, gives the original's image (at most 1 level of 255 apart) and latents (<= 1e-3).
2. A full-size random SD 1.x fp16 file: load time and device memory; UNet fp16 vs fp32 on the device;
   a 512x512 DDIM txt2img in fp16: seconds per step, peak memory, NaN-free, identical when repeated.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ldm  # noqa: E402
from ldm.images import to_uint8  # noqa: E402
from ldm.pipeline import txt2img, txt2img_steps  # noqa: E402
from samplers import drain  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fixtures_on_device(shared: Path, device: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in ("sd1_tiny", "sd2_tiny", "sd2v_tiny"):
        d = shared / "reference" / "fixtures" / name
        if not (d / f"{name}.safetensors").exists():
            continue
        meta = json.loads((d / "txt2img.json").read_text())
        ref = load_file(d / "txt2img.safetensors")
        model = ldm.load(d / f"{name}.safetensors", config=d / f"{name}.yaml", device=device, dtype="float32")
        sampler = "plms" if meta["sampler"] == "PLMSSampler" else "ddim"
        g = torch.Generator().manual_seed(meta["seed"])
        x_T = torch.randn(ref["start_code"].shape, generator=g)
        latents = drain(txt2img_steps(model, meta["prompt"], height=meta["H"], width=meta["W"], sampler=sampler,
                                      steps=meta["ddim_steps"], scale=meta["scale"], generator=g, x_T=x_T), x_T)
        image = to_uint8(txt2img(model, meta["prompt"], seed=meta["seed"], fixed_code=True, height=meta["H"],
                                 width=meta["W"], steps=meta["ddim_steps"], sampler=sampler, scale=meta["scale"])[0])
        out[name] = {"latent_max_diff": (latents.cpu() - ref["samples"]).abs().max().item(),
                     "uint8_max_diff": int(np.abs(image[0].astype(int) - ref["image_uint8_hwc"].numpy()).max())}
    return out


def full_size(shared: Path, device: str, steps: int) -> dict:
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd1_fp16.safetensors"
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), str(path), "--layout",
                        str(shared / "reference" / "layouts" / "sd1.json"), "--dtype", "float16"], check=True)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model = ldm.load(path, device=device, dtype="float16")
        sync(dev)
        report = {"load_seconds": time.perf_counter() - t}
        if dev.type == "cuda":
            report["load_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 64, 64, generator=g).to(dev)
        ctx = torch.randn(2, 77, 768, generator=g).to(dev)
        ts = torch.tensor([999, 10], device=dev)
        with torch.no_grad():
            half = model.unet(x, ts, ctx)
            model.unet.float()
            full = model.unet(x, ts, ctx)
            model.unet.half()
        report["unet_fp16_vs_fp32"] = {"max_abs": (half - full).abs().max().item(),
                                       "rel_rms": ((half - full).pow(2).mean() / full.pow(2).mean()).sqrt().item(),
                                       "finite": bool(torch.isfinite(half).all())}
        kw = dict(height=512, width=512, steps=steps, sampler="ddim", scale=7.5)
        txt2img(model, "warm up", seed=1, **{**kw, "steps": 2})
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        t = time.perf_counter()
        a = txt2img(model, "a photograph of an astronaut riding a horse", seed=42, **kw)[0]
        sync(dev)
        report["txt2img_512_seconds_per_step"] = (time.perf_counter() - t) / steps
        if dev.type == "cuda":
            report["txt2img_512_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        b = txt2img(model, "a photograph of an astronaut riding a horse", seed=42, **kw)[0]
        report["txt2img_repeat_identical"] = bool(torch.equal(a, b))
        report["txt2img_finite"] = bool(torch.isfinite(a).all())
        if dev.type == "cuda":
            report["lowvram"] = lowvram(path, dev, kw, a)
            report["compile"] = compiled(model, kw, steps)
    return report


def lowvram(path: Path, dev: torch.device, kw: dict, reference: torch.Tensor) -> dict:
    """The whole 512x512 txt2img with --lowvram's offload: peak device memory, and the same image."""
    from ldm.device import Placement, configure_backends
    from ldm.offload import enable_lowvram

    model = ldm.load(path, device=Placement(torch.device("cpu"), torch.float16))
    configure_backends(Placement(dev, torch.float16))
    enable_lowvram(model, dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # the normal-mode model is still on the device: count above it
    t = time.perf_counter()
    image = txt2img(model, "a photograph of an astronaut riding a horse", seed=42, **kw)[0]
    sync(dev)
    return {"peak_gb_above_start": (torch.cuda.max_memory_allocated() - before) / 2 ** 30,
            "seconds": time.perf_counter() - t,
            "max_diff_vs_normal": (image.cpu() - reference.cpu()).abs().max().item()}


def compiled(model, kw: dict, steps: int) -> dict:
    """--compile: torch.compile'd UNet, first run (compiling) and then seconds per step."""
    eager_unet = model.unet
    model.unet = torch.compile(eager_unet)
    t = time.perf_counter()
    txt2img(model, "warm up", seed=1, **{**kw, "steps": 2})
    sync(next(eager_unet.parameters()).device)
    first = time.perf_counter() - t
    t = time.perf_counter()
    txt2img(model, "a photograph of an astronaut riding a horse", seed=42, **kw)
    sync(next(eager_unet.parameters()).device)
    model.unet = eager_unet
    return {"compile_and_first_run_seconds": first, "seconds_per_step": (time.perf_counter() - t) / steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = str(ldm.resolve(args.device).device)
    report = {"device": device, "torch": torch.__version__,
              "name": torch.cuda.get_device_name() if device.startswith("cuda") else device}
    report["fixtures"] = fixtures_on_device(args.shared, device)
    print(json.dumps(report, indent=1), flush=True)
    report["full_size_sd1"] = full_size(args.shared, device, args.steps)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
