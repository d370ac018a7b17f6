"""`python -m ldm inspect CKPT`: what a checkpoint holds, without building anything (unless --load)."""
from __future__ import annotations

import resource
import sys
import time
from collections import Counter
from pathlib import Path


from weights import detect_family, read_checkpoint, schedule_buffers, split_components


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _count(tensors: dict) -> int:
    return sum(t.numel() for t in tensors.values())


def summarize(path: Path, load: bool = False, config=None, ema: bool = False) -> dict:
    state = read_checkpoint(path)
    family = detect_family({k: tuple(v.shape) for k, v in state.items()})
    parts = split_components(state)
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in state.values())
    buffers = schedule_buffers(state)
    extras = Counter("schedule buffers" if k in buffers else
                     k.split(".")[0] if k.startswith(("model_ema.", "depth_model.", "low_scale_model.", "loss."))
                     else k for k in parts.extras)
    info = {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "family": family,
        "dtypes": dict(dtypes),
        "parameters": {name: _count(part) for name, part in parts.parts.items()},
        "ema": any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")
                   for k in state),
        "recognised_extra_keys": dict(extras),
        "unknown_keys": parts.unknown[:20],
        "n_unknown_keys": len(parts.unknown),
        "schedule_buffers": sorted(buffers),
    }
    if family != "vae":
        from models.config import PRESETS

        from .loading import sampling_schedule

        agree = sampling_schedule(PRESETS[family], buffers)[1]
        info["schedule"] = {None: "from the config (no schedule buffers in the file)",
                            True: "checkpoint buffers (agree with the config's linear schedule)",
                            False: "checkpoint buffers (DISAGREE with the config's linear schedule; sampling "
                                   "uses the checkpoint's)"}[agree]
    del state, parts
    if load and family != "vae":
        from .loading import load as load_model

        start = time.perf_counter()
        model = load_model(path, config=config, device="cpu", ema=ema)
        info["load_seconds"] = round(time.perf_counter() - start, 3)
        info["loaded_dtype"] = str(next(model.unet.parameters()).dtype).replace("torch.", "")
        info["notes"] = model.notes
    info["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return info


def format_summary(info: dict) -> str:
    lines = [f"{info['file']}  ({info['size_bytes'] / 1e9:.2f} GB)",
             f"  family        {info['family']}",
             f"  dtypes        {', '.join(f'{d} x{n}' for d, n in info['dtypes'].items())}"]
    for name, n in info["parameters"].items():
        lines.append(f"  {name:<13} {n / 1e6:,.1f} M parameters")
    lines.append(f"  EMA weights   {'yes (--ema selects them)' if info['ema'] else 'no'}")
    if "schedule" in info:
        lines.append(f"  schedule      {info['schedule']}")
    if info["recognised_extra_keys"]:
        extras = ", ".join(f"{k} ({n})" if n > 1 else k for k, n in info["recognised_extra_keys"].items())
        lines.append(f"  also holds    {extras}")
    if info["n_unknown_keys"]:
        lines.append(f"  unknown keys  {info['n_unknown_keys']}: {', '.join(info['unknown_keys'][:5])}")
    if "load_seconds" in info:
        lines.append(f"  loaded in     {info['load_seconds']:.2f} s as {info['loaded_dtype']}")
        lines.extend(f"  note          {n}" for n in info["notes"])
    lines.append(f"  peak RSS      {info['peak_rss_mb']:,.0f} MB")
    return "\n".join(lines)
