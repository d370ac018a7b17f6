"""Speed and memory of ldm against diffusers, on the same random SD weights, in one process.

    .venv/bin/python tools/bench.py --dtypes float32 --json bench.json    # all rows in float32
    .venv/bin/python tools/bench.py --rows unet256 --dtypes float32 --repeats 3
    .venv/bin/python tools/bench.py --rows unet512,txt2img --dtypes float32,bfloat16 --steps 4
    .venv/bin/python tools/bench.py --device cuda --dtypes float32,float16,bfloat16 --steps 20 --json cuda.json
    .venv/bin/python tools/bench.py --rows upscale --dtypes float32 --steps 20 --repeats 1 --warmup 0  # 256 -> 1024
    .venv/bin/python tools/bench.py --tiny --repeats 1 --warmup 0         # tiny configs: a smoke run in seconds
    OMP_NUM_THREADS=2 .venv/bin/python tools/bench.py --rows unet512 --dtypes bfloat16 --compile  # ldm compiled

Needs the reference data (`../shared`, or `LDM_SHARED=...`, or `--shared`) for the official key layouts, plus
diffusers and transformers (the test extras); nothing is downloaded. Full-size models: about 9 GB of RAM
(each library holds its own copy of the weights; the load rows' diffusers process peaks near 9 GB). On a
2-core CPU a float32 run of every row takes over an hour (a 512x512 CFG step is tens of seconds, txt2img
and sd2 are the slow rows) and bfloat16 without native CPU support several times that; on an H200 the
SD 1.x and sd2 rows in float32 and float16 (20-step txt2img) took about a minute, model building included.

How it compares. One random SD 1.x checkpoint in the official layout (`tools/make_checkpoint.py`'s weights,
keys from `shared/reference/layouts/sd1.json`) is built into ldm's networks and, through diffusers' own
original-checkpoint converters (`create_unet_diffusers_config_from_ldm`, `convert_ldm_unet_checkpoint`,
`create_vae_diffusers_config_from_ldm`, `convert_ldm_vae_checkpoint`), into diffusers' `UNet2DConditionModel`
and `AutoencoderKL`; the text encoder is transformers' `CLIPTextModel` with the same weights. Each row runs
`--warmup` untimed calls of each library, then `--repeats` rounds that alternate which library goes first,
and reports the medians. On CUDA the device is synchronised before and after every timed call. Both
libraries run under the same global backend flags (ldm's policy, as `ldm.load` sets it: on CUDA in float32,
TF32 off) and both attend through PyTorch's scaled_dot_product_attention.

Rows (`--rows`, comma-separated; default all):
    unet256, unet512  one classifier-free-guidance step: the UNet on a batch of 2 (uncond + cond) at
                      256x256 / 512x512 (latents 32x32 / 64x64), then uncond + 7.5 (cond - uncond)
    vae               VAE decode of one 512x512 image
    text              the text encoder on a batch of 2 token sequences (a prompt and "")
    txt2img           a whole 512x512 txt2img of `--steps` DDIM steps (default 4) at guidance 7.5, from the
                      prompt: `ldm.pipeline.txt2img` on a LatentDiffusion assembled from the networks above, and
                      diffusers' `StableDiffusionPipeline` from its converted components with a DDIMScheduler,
                      no safety checker, and a CLIPTokenizer written from open_clip's BPE (same token ids);
                      both start from the same x_T
    load              file -> the three networks on `--device`, in its default dtype (float32 on a CPU, float16
                      on CUDA) or `--load-dtype`, every weight resident (read once: ldm memory-maps a float32 file and would
                      otherwise read it on first use); from an fp16 and an fp32 .safetensors, each load in a
                      fresh subprocess, with its peak RSS (VmHWM; for ldm it counts the mapped file's pages).
                      ldm: `ldm.load(file, config=original.yaml)`, then `place_now` on the parts it leaves for
                      their first call (the VAE encoder), as diffusers loads them all. diffusers: `from_single_file`
                      cannot build a pipeline offline (it fetches the diffusers configs from the hub), so the stand-in is what
                      it does per component, offline: diffusers' checkpoint reader once, then
                      `UNet2DConditionModel.from_single_file` / `AutoencoderKL.from_single_file` with
                      `original_config=` and `create_diffusers_clip_model_from_ldm` with a local CLIP config.
                      Without `accelerate` installed diffusers initialises random weights before loading, as
                      it would for a user. A last row gives each library's import time in those processes.
    sd2               the SD 2.x 768-v UNet (its official layout and config): one CFG step at `--sd2-size`
                      (default 768; 512 for a quicker run), once per `--dtypes` entry
    upscale           the x4 upscaler (its official layout, all of it, and config): a whole 4x upscale of an
                      `--upscale-size` image (default 256 -> 1024) in `--steps` DDIM steps at the script's
                      guidance 10 and noise level 20: `ldm.pipeline.upscale` against diffusers'
                      `StableDiffusionUpscalePipeline` on the converted networks (UNet with the noise level as
                      class label, f=4 VAE scaled 0.08333, the OpenCLIP tower as transformers' CLIPTextModel one
                      block short of its penultimate layer, a DDIMScheduler for v-prediction and the low-res
                      DDPMScheduler, both "scaled_linear" 1e-4..2e-2, which is the original's "linear"). Both get
                      ldm's start code (numpy) and ldm's unit noise for the low-res image's augmentation (handed
                      to the diffusers scheduler's add_noise), so they compute the same thing; with a step count
                      that does not divide 1000 the original DDIM spacing runs more steps than diffusers', and a
                      note says the outputs differ. Use `--steps 20` for the issue's 20-step figure.
The SD 1.x rows (all but load), sd2 and upscale run once per `--dtypes` entry (default float32,bfloat16;
bfloat16 on a CPU without native support is emulated, and a note says so; `--dtypes float32` skips it).

Output: a table of ldm's and diffusers' medians, ldm/diffusers (below 1: ldm is faster) and the max abs
difference of the two outputs, which shows both ran the same computation (the parity tests are in tests/;
with these random weights the UNet's output is small, about 0.05, so it is a sanity check only); then each
side's achieved TFLOP/s (the row's FLOPs, counted once by torch's FlopCounterMode on diffusers' call, over
the median time) and ldm's as a fraction of this machine's plain matmul rate in the row's dtype, measured at
startup (the best of 2048x2048 matmuls over half a second; printed first), so progress reads the same on any CPU or GPU.
`--json out.json` adds every run's time, the outputs' scale and the machine: CPU model, cores, torch threads,
native bf16, memory, the torch/diffusers/transformers versions, the GPU and TF32 flags on CUDA.
`--tiny` uses the tiny reference configs (`shared/reference/fixtures/sd1_tiny`, `sd2v_tiny`,
`shared/reference/special/x4_upscaler_tiny`) with the image sizes divided by 8, for tests.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

# The rows live by idea in these modules; none of them imports this one. original_config and prepare_load_dir
# are re-exported for tests/test_bench.py, which reaches them as bench.X.
from bench_load import load_child, load_rows, prepare_load_dir  # noqa: E402,F401
from bench_networks import (DTYPES, PROMPT, Spec, diffusers_networks, dtype_name, ldm_networks,  # noqa: E402,F401
                            max_abs_diff, original_config, place_both, place_ldm, random_checkpoint, size, spec,
                            sync, write_clip_tokenizer)
from bench_upscale import upscale_rows  # noqa: E402

ROWS = ("unet256", "unet512", "vae", "text", "txt2img", "load", "sd2", "upscale")
GUIDANCE = 7.5


def shared_dir(arg: Optional[str]) -> Path:
    return Path(arg or os.environ.get("LDM_SHARED") or ROOT.parent / "shared")


# ---------------------------------------------------------------- timing
def count_flops(fn: Callable) -> tuple:
    """(fn(), the floating-point operations it made), by torch's FlopCounterMode (matmuls, convolutions,
    attention; elementwise ops count zero, as usual). The CPU's flash-attention op is counted as the
    other fused attention ops are."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_flash: lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop(q, k, v)} if cpu_flash else {}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = fn()
    return out, counter.get_total_flops() or None


def matmul_tflops(dtype: torch.dtype, device: torch.device, n: int) -> float:
    """The best of n x n @ n x n matmuls in `dtype` on `device` (at least 3, for at least half a second: on a
    shared machine the best one is the machine's, the others its neighbours'), in TFLOP/s: the matrix rate
    the rows' achieved rates are a fraction of."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    torch.mm(a, b)  # sets up the kernel
    best, runs, spent = float("inf"), 0, 0.0
    while runs < 3 or (spent < 0.5 and runs < 50):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        took = time.perf_counter() - start
        best, runs, spent = min(best, took), runs + 1, spent + took
    return 2 * n ** 3 / best / 1e12


class Bench:
    def __init__(self, args, device: torch.device, matmul_rates: Optional[dict] = None):
        self.args, self.device = args, device
        self.matmul_tflops: dict = matmul_rates or {}  # dtype name -> TFLOP/s of a plain matmul here
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self._printed_header = False

    def compare(self, row: str, label: str, ldm_fn: Callable, diffusers_fn: Callable, **extra) -> dict:
        """Warm-up runs of each, then `repeats` rounds alternating which goes first; medians in seconds.
        The row's FLOPs are counted on diffusers' first call (plain PyTorch ops the counter knows; ldm's
        oneDNN ops it does not), made in the warm-up, or after the timing without one."""
        fns = {"ldm": ldm_fn, "diffusers": diffusers_fn}
        outputs, flops = {}, None
        with torch.no_grad():
            for i in range(self.args.warmup):
                for side, fn in fns.items():
                    if i == 0 and side == "diffusers":
                        outputs[side], flops = count_flops(fn)
                    else:
                        outputs[side] = fn()
            times = {"ldm": [], "diffusers": []}
            for i in range(self.args.repeats):
                for side in (("ldm", "diffusers") if i % 2 == 0 else ("diffusers", "ldm")):
                    sync(self.device)
                    start = time.perf_counter()
                    outputs[side] = fns[side]()
                    sync(self.device)
                    times[side].append(time.perf_counter() - start)
            if flops is None:
                flops = count_flops(diffusers_fn)[1]
        out = outputs["ldm"]
        scale = out.float().abs().max().item() if isinstance(out, torch.Tensor) else None
        return self.add(row, label, "s", times, max_abs_diff(out, outputs["diffusers"]), output_max_abs=scale,
                        flops=flops, **extra)

    def add(self, row: str, label: str, unit: str, runs: dict, diff: Optional[float] = None,
            flops: Optional[float] = None, **extra) -> dict:
        medians = {side: statistics.median(v) for side, v in runs.items()}
        result = {"row": row, "label": label, "unit": unit, "ldm": medians["ldm"], "diffusers": medians["diffusers"],
                  "ratio": medians["ldm"] / medians["diffusers"] if medians["diffusers"] else None,
                  "max_abs_diff": diff, "runs": runs, "flops": flops, **extra}
        if flops:
            rate = self.matmul_tflops.get(extra.get("dtype"))
            result["tflops"] = {side: flops / t / 1e12 for side, t in medians.items() if t}
            result["fraction_of_matmul"] = result["tflops"]["ldm"] / rate if rate and "ldm" in result["tflops"] else None
        self.rows.append(result)
        self.print_row(result)
        return result

    def print_row(self, r: dict) -> None:
        if not self._printed_header:
            print(f"{'row':<44} {'ldm':>10} {'diffusers':>10} {'ldm/diff':>9} {'max|diff|':>10} "
                  f"{'TFLOP/s ldm':>11} {'diffusers':>9} {'ldm/mm':>6}")
            print("-" * 117)
            self._printed_header = True
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        tf = r.get("tflops") or {}
        rates = "".join(f" {tf[side]:>{w}.3f}" if side in tf else " " * (w + 1) for side, w in (("ldm", 11), ("diffusers", 9)))
        frac = "" if r.get("fraction_of_matmul") is None else f"{r['fraction_of_matmul']:.0%}"
        print(f"{r['label']:<44} {r['ldm']:>9.3f}{r['unit']:<1} {r['diffusers']:>9.3f}{r['unit']:<1} "
              f"{ratio:>9} {diff:>10}{rates} {frac:>6}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)


# ---------------------------------------------------------------- rows
def unet_row(bench: Bench, row: str, s: Spec, nets: dict, refs: dict, image: int, dtype: torch.dtype) -> None:
    cfg, device = s.cfg, bench.device
    f = cfg.vae.downsampling_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.unet.in_channels, image // f, image // f, generator=g).to(device, dtype)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)

    def guide(out):
        uncond, cond = out.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    unet, ref, compiled = nets["unet"], refs["unet"], ""
    if bench.args.compile:  # ldm's unet as `--compile` runs it; compiled in the warm-up; diffusers stays eager
        from ldm.generate import compile_unet

        unet, compiled = compile_unet(unet, device), " (ldm compiled)"
    bench.compare(row, f"{s.name} unet cfg step {image}x{image} {dtype_name(dtype)}{compiled}",
                  lambda: guide(unet(torch.cat([x, x]), t, context)),
                  lambda: guide(ref(torch.cat([x, x]), t, encoder_hidden_states=context).sample),
                  dtype=dtype_name(dtype), size=image, batch=2)


def vae_row(bench: Bench, s: Spec, nets: dict, refs: dict, image: int, dtype: torch.dtype) -> None:
    f = s.cfg.vae.downsampling_factor
    z = torch.randn(1, s.cfg.vae.embed_dim, image // f, image // f,
                    generator=torch.Generator().manual_seed(1)).to(bench.device, dtype)
    vae, ref = nets["vae"], refs["vae"]
    bench.compare("vae", f"{s.name} vae decode {image}x{image} {dtype_name(dtype)}",
                  lambda: vae.decode(z), lambda: ref.decode(z).sample, dtype=dtype_name(dtype), size=image, batch=1)


def text_row(bench: Bench, s: Spec, nets: dict, refs: dict, dtype: torch.dtype) -> None:
    from models.tokenizer import tokenizer_for

    tokens = tokenizer_for(s.cfg.text)([PROMPT, ""]).to(bench.device)
    text, ref = nets["text"], refs["text"]
    bench.compare("text", f"{s.name} text encode batch 2 {dtype_name(dtype)}",
                  lambda: text(tokens), lambda: ref(input_ids=tokens).last_hidden_state,
                  dtype=dtype_name(dtype), batch=2)


def txt2img_row(bench: Bench, s: Spec, nets: dict, refs: dict, image: int, dtype: torch.dtype,
                tokenizer_dir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm import LatentDiffusion
    from ldm.device import Placement
    from ldm.pipeline import latent_shape, txt2img
    from models.tokenizer import tokenizer_for
    from samplers.schedule import linear_alphas_cumprod

    cfg, steps, seed = s.cfg, bench.args.steps, 42
    model = LatentDiffusion(
        family="sd1", config=cfg, unet=nets["unet"], vae=nets["vae"], text_encoder=nets["text"],
        tokenizer=tokenizer_for(cfg.text), placement=Placement(bench.device, dtype),
        alphas_cumprod=linear_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps))
    scheduler = DDIMScheduler(beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear",
                              num_train_timesteps=cfg.timesteps, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=refs["vae"], text_encoder=refs["text"], unet=refs["unet"], scheduler=scheduler,
                                   tokenizer=write_clip_tokenizer(tokenizer_dir), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # ldm's txt2img draws x_T first from a CPU generator seeded with `seed`; diffusers gets the same x_T.
    x_T = torch.randn(latent_shape(model, 1, image, image), generator=torch.Generator().manual_seed(seed))

    def ours():
        return ((txt2img(model, PROMPT, seed=seed, height=image, width=image, steps=steps, sampler="ddim",
                         scale=GUIDANCE, eta=0.0)[0] + 1) / 2).clamp(0, 1)

    def theirs():
        return pipe(PROMPT, height=image, width=image, num_inference_steps=steps, guidance_scale=GUIDANCE,
                    latents=x_T.to(bench.device, dtype), output_type="pt").images

    bench.compare("txt2img", f"{s.name} txt2img {image}x{image} {steps} ddim steps {dtype_name(dtype)}",
                  ours, theirs, dtype=dtype_name(dtype), size=image, steps=steps)


def sd1_rows(bench: Bench, args, shared: Path, dtypes: list, tmp: Path) -> None:
    s = spec("sd1", args.tiny, shared)
    needs = {"unet256": ["unet"], "unet512": ["unet"], "vae": ["vae"], "text": ["text"],
             "txt2img": ["unet", "vae", "text"]}
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text": "cond_stage_model."}
    state = random_checkpoint(s, prefix=tuple({prefixes[n] for r in args.rows for n in needs.get(r, [])}))
    nets = ldm_networks(s, state)
    refs = diffusers_networks(s, state)
    del state
    gc.collect()
    for dtype in dtypes:
        place_both(nets, refs, bench.device, dtype, args)
        if "unet256" in args.rows:
            unet_row(bench, "unet256", s, nets, refs, size(args, 256), dtype)
        if "unet512" in args.rows:
            unet_row(bench, "unet512", s, nets, refs, size(args, 512), dtype)
        if "vae" in args.rows:
            vae_row(bench, s, nets, refs, size(args, 512), dtype)
        if "text" in args.rows:
            text_row(bench, s, nets, refs, dtype)
        if "txt2img" in args.rows:
            txt2img_row(bench, s, nets, refs, size(args, 512), dtype, tmp)
    del nets, refs
    gc.collect()


def sd2_rows(bench: Bench, args, shared: Path, dtypes: list) -> None:
    s = spec("sd2v", args.tiny, shared)
    state = random_checkpoint(s, prefix="model.diffusion_model.")
    nets, refs = ldm_networks(s, state), diffusers_networks(s, state)
    del state
    for dtype in dtypes:
        refs["unet"].to(bench.device, dtype)
        place_ldm(nets["unet"], bench.device, dtype, args)
        gc.collect()
        unet_row(bench, "sd2", s, nets, refs, size(args, args.sd2_size), dtype)
    del nets, refs
    gc.collect()


# ---------------------------------------------------------------- machine and main
def machine(device: torch.device) -> dict:
    import diffusers
    import transformers

    from ldm.device import cpu_has_bf16

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_has_bf16": cpu_has_bf16(),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(), "device": str(device)}
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = int(f.readline().split()[1]) / 2 ** 20
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the SD 1.x rows (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per library and row (the median is shown)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per library before timing")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps of the txt2img and upscale rows")
    p.add_argument("--sd2-size", type=int, default=768, choices=(512, 768), help="image size of the sd2 row")
    p.add_argument("--upscale-size", type=int, default=256, help="the upscale row's low-res image size (default "
                   "256: 256x256 -> 1024x1024; a multiple of 8)")
    p.add_argument("--load-dtype", choices=("float32", "float16", "bfloat16"),
                   help="the dtype the load rows make ready (default: float32 on a CPU, float16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="time ldm's UNet rows compiled as `--compile` does "
                   "(freezing on a CPU) against diffusers in eager mode; compiling happens in the warm-up")
    p.add_argument("--no-prepack", action="store_true", help="ldm's CPU layers as plain PyTorch runs them: no "
                   "prepacked convolutions, no oneDNN linears (to measure what those gain)")
    p.add_argument("--tiny", action="store_true", help="tiny reference configs and image sizes / 8 (smoke test)")
    p.add_argument("--shared", help="the shared/ folder with reference/ (default $LDM_SHARED or ../shared)")
    p.add_argument("--json", type=Path, help="write the results and the machine description here")
    p.add_argument("--load-child", choices=("ldm", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--load-child-dir", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if sorted(set(args.dtypes) - set(DTYPES)):
        p.error(f"unknown dtypes {args.dtypes}; choose from {','.join(DTYPES)}")
    if args.upscale_size < 8 or args.upscale_size % 8:
        p.error("--upscale-size must be a multiple of 8")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1: the first call compiles")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.load_child:
        return load_child(args)
    from diffusers.utils import logging as diffusers_logging

    from ldm.device import Placement, configure_backends, cpu_has_bf16, resolve_device

    diffusers_logging.set_verbosity_error()
    device = resolve_device(args.device)
    dtypes = [DTYPES[d] for d in args.dtypes]
    shared = shared_dir(args.shared)
    info = machine(device)
    print(f"{info['cpu']}, {info['cpus_usable']} cpus, torch {info['torch']} ({info['torch_threads']} threads), "
          f"diffusers {info['diffusers']}, transformers {info['transformers']}, device {device}"
          + (f" ({info['gpu']})" if "gpu" in info else ""), flush=True)
    # The machine's matrix rates, so each row's TFLOP/s reads as a fraction of what this machine can do.
    n = 256 if args.tiny else 2048
    info["matmul_tflops"] = {dtype_name(d): matmul_tflops(d, device, n)
                             for d in dict.fromkeys([torch.float32, torch.bfloat16, *dtypes])}
    info["matmul_n"] = n
    print("matmul rate (" + f"{n}x{n}): " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in info["matmul_tflops"].items()),
          flush=True)
    bench = Bench(args, device, info["matmul_tflops"])
    sd1 = bool(set(args.rows) & {"unet256", "unet512", "vae", "text", "txt2img"})
    per_dtype = sd1 or "sd2" in args.rows or "upscale" in args.rows
    if per_dtype and device.type == "cpu" and torch.bfloat16 in dtypes and not cpu_has_bf16():
        bench.note("this CPU has no native bfloat16 (AVX-512 BF16, AMX or ARM BF16): bfloat16 rows run emulated")
    if per_dtype and device.type == "cpu" and torch.float16 in dtypes:
        bench.note("float16 on a CPU: ldm's own policy would use bfloat16 or float32 instead; timed as asked")
    if "sd2" in args.rows and args.sd2_size != 768:
        bench.note(f"sd2 row at {args.sd2_size}x{args.sd2_size} instead of the 768-v model's native 768x768")
    # ldm.load applies its backend policy (on CUDA in float32: TF32 off) once per process; both libraries
    # run under it here, so the comparison is of the code, not of the flags.
    configure_backends(Placement(device, torch.float32 if torch.float32 in dtypes or not dtypes else dtypes[0]))
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as tmp:
        tmp = Path(tmp)
        if "load" in args.rows:
            load_rows(bench, args, shared, tmp)
        if sd1 and dtypes:
            sd1_rows(bench, args, shared, dtypes, tmp)
        if "sd2" in args.rows:
            sd2_rows(bench, args, shared, dtypes or [torch.float32])
        if "upscale" in args.rows:
            upscale_rows(bench, args, shared, dtypes or [torch.float32], tmp)
    info.update({k: v for k, v in machine(device).items() if "tf32" in k})
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                      if not k.startswith(("load_child", "ckpt"))},
            "rows": bench.rows, "notes": bench.notes}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
