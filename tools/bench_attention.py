"""The attention options of models/layers.py side by side on the shapes of an SD 1.x / 2.x 512x512 CFG step
(batch 2) and the VAE's decode, on the CPU: median milliseconds, achieved TFLOP/s, and what
`attention_choice` picks for the shape.

    .venv/bin/python tools/bench_attention.py --threads 2 --dtypes bfloat16,float32
    .venv/bin/python tools/bench_attention.py --threads 1 --repeats 5 --onednn-graph

Options: `flash` (F.scaled_dot_product_attention: PyTorch's CPU flash kernel), `matmul` (two batched matmuls,
heads merged into the batch, in cache-sized query slices, float32 softmax), and with --onednn-graph the
same math traced by TorchScript with oneDNN Graph fusion on (`torch.jit.enable_onednn_fusion`: the one
fused oneDNN attention this PyTorch exposes to eager code; measured only, never used by ldm). The options
run alternately, round after round, so a busy machine slows them alike; the max abs difference to float32
math shows they compute the same thing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import layers  # noqa: E402

# (label, B, H, Tq, Tk, d): a 512x512 CFG step's attention calls (batch 2), and the VAE's (batch 1)
SHAPES = [
    ("sd1 64x64 self", 2, 8, 4096, 4096, 40), ("sd1 64x64 cross", 2, 8, 4096, 77, 40),
    ("sd1 32x32 self", 2, 8, 1024, 1024, 80), ("sd1 32x32 cross", 2, 8, 1024, 77, 80),
    ("sd1 16x16 self", 2, 8, 256, 256, 160), ("sd1 16x16 cross", 2, 8, 256, 77, 160),
    ("sd1 8x8 self", 2, 8, 64, 64, 160),
    ("sd2 64x64 self", 2, 5, 4096, 4096, 64), ("sd2 64x64 cross", 2, 5, 4096, 77, 64),
    ("sd2 32x32 self", 2, 10, 1024, 1024, 64), ("sd2 16x16 self", 2, 20, 256, 256, 64),
    ("vae 64x64 self", 1, 1, 4096, 4096, 512),
]


def onednn_graph(q, k, v):
    """The attention math traced with oneDNN Graph fusion on: it fuses matmul, scale, softmax, matmul."""
    torch.jit.enable_onednn_fusion(True)
    scale = q.shape[-1] ** -0.5

    def math(q, k, v):
        return torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(-1), v)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(math, (q, k, v))
        for _ in range(2):  # the profiling runs, after which the fused graph runs
            traced(q, k, v)
    return traced


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the median is shown")
    p.add_argument("--shapes", help="comma-separated label substrings to keep (e.g. 'sd1 64x64,vae')")
    p.add_argument("--onednn-graph", action="store_true", help="also time TorchScript's oneDNN Graph fusion")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [s for s in SHAPES if not args.shapes or any(w.strip() in s[0] for w in args.shapes.split(","))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, L2 slice budget {layers.CACHE_BYTES} B")
    names = list(layers.KERNELS) + (["onednn_graph"] if args.onednn_graph else [])
    print(f"{'shape (B, H, Tq, Tk, d)':<44} {'dtype':<9} " + " ".join(f"{n:>20}" for n in names)
          + f" {'chosen':>7} {'max|diff|':>9}")
    g = torch.Generator().manual_seed(0)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name.strip())
        for label, b, h, tq, tk, d in shapes:
            q, k, v = (torch.randn(b, h, t, d, generator=g).to(dtype) for t in (tq, tk, tk))
            fns = {n: layers.KERNELS[n] for n in layers.KERNELS}
            if args.onednn_graph:
                fns["onednn_graph"] = onednn_graph(q, k, v)
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            times, diff = {n: [] for n in fns}, 0.0
            with torch.no_grad():
                for n, fn in fns.items():
                    diff = max(diff, (fn(q, k, v).float() - reference).abs().max().item())
                for r in range(args.repeats):
                    for n in (names if r % 2 == 0 else names[::-1]):
                        start = time.perf_counter()
                        fns[n](q, k, v)
                        times[n].append(time.perf_counter() - start)
                chosen = layers.attention_choice(q, k, v)
            flop = 4 * b * h * tq * tk * d
            cells = []
            for n in names:
                t = statistics.median(times[n])
                cells.append(f"{t * 1e3:>9.1f} ms {flop / t / 1e12:>5.2f} TF")
            print(f"{label + f' ({b}, {h}, {tq}, {tk}, {d})':<44} {dtype_name:<9} " + " ".join(f"{c:>20}" for c in cells)
                  + f" {chosen:>7} {diff:>9.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
