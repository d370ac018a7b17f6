"""Where one UNet classifier-free-guidance step spends its time on the CPU: torch.profiler's table of ops,
and a summary of the copies (aten::copy_, contiguous, dtype casts, reorders) the step makes.

    .venv/bin/python tools/profile_step.py --dtype bfloat16 --size 512 --threads 2
    .venv/bin/python tools/profile_step.py --dtype float32 --size 256 --top 25 --json prof.json
    .venv/bin/python tools/profile_step.py --tiny                      # the tiny SD 1 fixture: seconds

The network is ldm's SD 1.x UNet on random weights in the official layout, placed as `ldm.load` places it
(prepacked convolutions and oneDNN linears on the CPU, unless --no-prepack); one untimed step first, so
the table is of a warm step. Times are the profiler's (it adds overhead); for speed use tools/bench.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

# The ops that only move or convert data: what a kernel may not need.
COPY_OPS = ("aten::copy_", "aten::contiguous", "aten::clone", "aten::to", "aten::_to_copy", "aten::to_dense",
            "aten::to_mkldnn", "aten::_reorder_convolution_weight", "aten::cat", "aten::index")


def unet_step(args):
    """(step function, the UNet) for one CFG step of the SD 1.x UNet at args.size."""
    from bench import ldm_networks, place_ldm, random_checkpoint, shared_dir, spec

    s = spec("sd1", args.tiny, shared_dir(args.shared))
    dtype = getattr(torch, args.dtype)
    unet = ldm_networks(s, random_checkpoint(s, prefix="model.diffusion_model."))["unet"]
    place_ldm(unet, torch.device("cpu"), dtype, args)
    size = args.size // 8 if args.tiny else args.size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, s.cfg.unet.in_channels, size // 8, size // 8, generator=g).to(dtype)
    context = torch.randn(2, 77, s.cfg.unet.context_dim, generator=g).to(dtype)
    t = torch.tensor([500, 500])

    def step():
        uncond, cond = unet(torch.cat([x, x]), t, context).chunk(2)
        return uncond + 7.5 * (cond - uncond)
    return step, unet


def summary(events) -> dict:
    """The copies' share: calls and self CPU time of each data-movement op, and the step's total."""
    total = sum(e.self_cpu_time_total for e in events)
    copies = {e.key: {"calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in events if e.key in COPY_OPS}
    return {"total_self_ms": total / 1e3, "copies": copies,
            "copy_self_ms": sum(c["self_ms"] for c in copies.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--size", type=int, default=512, help="image size (latents size/8); default 512")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--top", type=int, default=20, help="rows of the op table")
    p.add_argument("--no-prepack", action="store_true", help="plain nn.Conv2d / nn.Linear (to compare)")
    p.add_argument("--tiny", action="store_true", help="the tiny SD 1 fixture, sizes / 8")
    p.add_argument("--shared", help="the shared/ folder with reference/ (default $LDM_SHARED or ../shared)")
    p.add_argument("--json", type=Path, help="write the op table and the copy summary here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    step, _ = unet_step(args)
    with torch.no_grad():
        step()  # warm: prepacked weights, oneDNN primitives, the attention choice
        start = time.perf_counter()
        step()
        plain = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            step()
    events = prof.key_averages()
    print(f"one {args.size}x{args.size} CFG step, {args.dtype}, {torch.get_num_threads()} threads: "
          f"{plain:.3f} s unprofiled")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    s = summary(events)
    print(f"copies: {s['copy_self_ms']:.1f} ms of {s['total_self_ms']:.1f} ms self CPU time")
    for name, c in sorted(s["copies"].items(), key=lambda kv: -kv[1]["self_ms"]):
        print(f"  {name:<36} {c['calls']:>5} calls {c['self_ms']:>9.1f} ms")
    if args.json:
        table = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                  "total_ms": e.cpu_time_total / 1e3} for e in events]
        args.json.write_text(json.dumps({"dtype": args.dtype, "size": args.size, "threads": torch.get_num_threads(),
                                         "seconds": plain, "summary": s, "ops": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
