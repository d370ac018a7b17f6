"""tools/bench.py's load rows: file -> the three networks resident, one fresh process per load (bench.py
`--load-child`), with its peak RSS. `bench` arguments are bench.py's Bench (not imported here: bench.py
imports this module).
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_networks import DTYPES, Spec, dtype_name, hf_clip_config, random_checkpoint, spec, sync

BENCH = Path(__file__).resolve().with_name("bench.py")  # the entry point each load child re-runs
ROOT = BENCH.parents[1]


def _rss_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def load_child(args) -> int:
    """Runs in a fresh process: load one checkpoint with one library and print a JSON line."""
    folder = Path(args.load_child_dir)
    device = torch.device(args.device)
    dtype = ready_dtype(args, device)
    start = time.perf_counter()
    if args.load_child == "ldm":
        import ldm
        from ldm.placing import place_now

        def load():
            model = ldm.load(args.ckpt, config=folder / "original.yaml", device=args.device, dtype=dtype_name(dtype))
            nets = [model.unet, model.vae, model.text_encoder]
            for net in nets:  # like for like: diffusers loads every part, ldm leaves unused ones for their first call
                place_now(net)
            return nets
    else:
        import transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import (create_diffusers_clip_model_from_ldm,
                                                         load_single_file_checkpoint)
        from diffusers.utils import logging as diffusers_logging

        original = str(folder / "original.yaml")

        def load():
            checkpoint = load_single_file_checkpoint(args.ckpt)
            unet = UNet2DConditionModel.from_single_file(checkpoint, original_config=original, torch_dtype=dtype)
            vae = AutoencoderKL.from_single_file(checkpoint, original_config=original, torch_dtype=dtype)
            text = create_diffusers_clip_model_from_ldm(transformers.CLIPTextModel, checkpoint,
                                                        config=str(folder / "clip"), torch_dtype=dtype,
                                                        local_files_only=True)
            return [m.to(device) for m in (unet, vae, text)]
        diffusers_logging.set_verbosity_error()
    import_seconds = time.perf_counter() - start
    gc.collect()
    before = _rss_gb("VmRSS")
    sync(device)
    start = time.perf_counter()
    modules = load()
    sync(device)
    load_seconds = time.perf_counter() - start
    rss_loaded = _rss_gb("VmHWM")
    # ldm leaves a float32 file used in float32 on the CPU memory-mapped: its pages are read on first use.
    # Reading every weight once makes "ready" mean the same for both: all weights in memory.
    with torch.no_grad():
        for m in modules:
            for t in (*m.parameters(), *m.buffers()):
                t.sum()
    sync(device)
    seconds = time.perf_counter() - start
    dtypes = sorted({dtype_name(p.dtype) for m in modules for p in m.parameters()})
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the parent's memory from before exec.
    out = {"seconds": seconds, "load_seconds": load_seconds, "touch_seconds": seconds - load_seconds,
           "import_seconds": import_seconds, "peak_rss_gb": _rss_gb("VmHWM"), "peak_rss_at_return_gb": rss_loaded,
           "rss_before_gb": before, "dtypes": dtypes}
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    print("LOAD_RESULT " + json.dumps(out))
    return 0


def ready_dtype(args, device: torch.device) -> torch.dtype:
    """The load rows' compute dtype: --load-dtype, else ldm's default for the device."""
    if args.load_dtype:
        return DTYPES[args.load_dtype]
    return torch.float32 if device.type == "cpu" else torch.float16


def run_child(side: str, ckpt: Path, folder: Path, args) -> dict:
    cmd = [sys.executable, str(BENCH), "--load-child", side, "--ckpt", str(ckpt),
           "--load-child-dir", str(folder), "--device", args.device] + (["--load-dtype", args.load_dtype]
                                                                       if args.load_dtype else [])
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("LOAD_RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{side} load of {ckpt.name} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("LOAD_RESULT "):])


def prepare_load_dir(s: Spec, folder: Path) -> None:
    """What both load children read besides the checkpoint: the original YAML config (ldm's `config=`,
    diffusers' `original_config=`) and transformers' CLIP config (a local stand-in for the hub's)."""
    import yaml

    (folder / "original.yaml").write_text(yaml.safe_dump(s.original))
    hf_clip_config(s.cfg.text).save_pretrained(folder / "clip")
    # ldm finds the tower the YAML names (`version:`) from its config.json beside the YAML
    version = s.original["model"]["params"]["cond_stage_config"]["params"]["version"]
    hf_clip_config(s.cfg.text).save_pretrained(folder / version)


def load_rows(bench, args, shared: Path, tmp: Path) -> None:
    from make_checkpoint import save

    s = spec("sd1", args.tiny, shared)
    prepare_load_dir(s, tmp)
    ready = dtype_name(ready_dtype(args, bench.device))
    for file_dtype in (torch.float16, torch.float32):
        ckpt = tmp / f"{s.name}-{dtype_name(file_dtype)}.safetensors"
        save(random_checkpoint(s, dtype=file_dtype), ckpt)
        gc.collect()
        file_gb = ckpt.stat().st_size / 1e9
        for _ in range(args.warmup):  # the first read of a new file comes from the disk, not the page cache
            for side in ("ldm", "diffusers"):
                run_child(side, ckpt, tmp, args)
        results = {"ldm": [], "diffusers": []}
        for i in range(args.repeats):
            for side in (("ldm", "diffusers") if i % 2 == 0 else ("diffusers", "ldm")):
                results[side].append(run_child(side, ckpt, tmp, args))
        ckpt.unlink()
        common = {"file_dtype": dtype_name(file_dtype), "ready_dtype": ready, "file_gb": file_gb}
        pick = lambda field: {side: [r[field] for r in rs] for side, rs in results.items()}  # noqa: E731
        bench.add("load", f"{s.name} load {dtype_name(file_dtype)} file -> {ready} resident", "s", pick("seconds"),
                  load_seconds=pick("load_seconds"), children=results, **common)
        bench.add("load", f"{s.name} load {dtype_name(file_dtype)} peak RSS (GB)", "G", pick("peak_rss_gb"),
                  rss_before_gb=pick("rss_before_gb"), **common)
        got = {side: sorted({d for r in rs for d in r["dtypes"]}) for side, rs in results.items()}
        if got["ldm"] != got["diffusers"]:
            bench.note(f"load {dtype_name(file_dtype)}: the networks came out as {got} (ldm vs diffusers)")
    bench.add("load", "import the library (load children)", "s", pick("import_seconds"))
