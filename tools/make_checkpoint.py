"""Write a checkpoint with random weights in an official layout, for tests and benchmarks.

    python tools/make_checkpoint.py --layout ../shared/reference/layouts/sd1.json --dtype float16 out.safetensors

The keys and shapes come from a layout file of `shared/reference/layouts/` (read from the original code),
so the file is indistinguishable from an official one except for its values: weights ~ N(0, 0.02²),
norm scales near 1, the real noise schedule, `position_ids` = arange. `--ema` adds the `model_ema.*`
shadow copy that full training checkpoints carry. `.ckpt` output is a Lightning-style pickle.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _schedule(layout: dict) -> dict:
    """The real noise schedule: SD's, or the x4 upscaler's (its model and its low-res noise augmentation)."""
    upscaler = "Upscale" in layout.get("model_class", "") or any(k.startswith("low_scale_model.") for k in layout["keys"])
    start, end = (0.0001, 0.02) if upscaler else (0.00085, 0.012)
    betas = torch.linspace(start ** 0.5, end ** 0.5, 1000, dtype=torch.float64) ** 2
    out = {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}
    if upscaler:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from models.upscaling import _schedule as low_scale_schedule

        out.update({f"low_scale_model.{k}": v for k, v in low_scale_schedule(0.0001, 0.02, 1000).items()})
    return out


def random_state(layout: dict, dtype: torch.dtype, seed: int = 0, ema: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    schedule = _schedule(layout)
    out = {}
    for key, (shape, stored_dtype) in layout["keys"].items():
        if stored_dtype == "int64":
            out[key] = torch.arange(shape[-1]).expand(shape).clone()
        elif key in schedule:
            out[key] = schedule[key]
        elif len(shape) <= 1 and key.endswith("weight") and "norm" in key:
            out[key] = (1 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        else:
            out[key] = (0.02 * torch.randn(shape, generator=g)).to(dtype)
    if ema:
        for key in layout.get("ema_keys") or [k for k in layout["keys"] if k.startswith("model.diffusion_model.")]:
            name = key if key.startswith("model_ema.") else "model_ema." + key[len("model."):].replace(".", "")
            if name.endswith(("decay", "num_updates")):
                out[name] = torch.tensor(0.9999 if name.endswith("decay") else 1000)
                continue
            unet_key = next(k for k in out if k.startswith("model.diffusion_model.") and
                            "model_ema." + k[len("model."):].replace(".", "") == name)
            out[name] = (out[unet_key].float() + 0.01).to(dtype)
    return out


def save(state: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output .safetensors or .ckpt")
    p.add_argument("--layout", required=True, type=Path, help="a shared/reference/layouts/*.json file")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action="store_true", help="add model_ema.* shadow weights")
    p.add_argument("--drop", action="append", default=[], help="leave out keys with this prefix (repeatable)")
    args = p.parse_args(argv)
    layout = json.loads(args.layout.read_text())
    state = random_state(layout, DTYPES[args.dtype], args.seed, args.ema)
    state = {k: v for k, v in state.items() if not k.startswith(tuple(args.drop))}
    save(state, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB, {len(state)} tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
