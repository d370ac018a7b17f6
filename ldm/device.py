"""The one place that looks at hardware: which device and which compute dtype.

Everything else takes a device and a dtype from here (or from the tensors it is given). The rules:
- `auto` picks CUDA, then MPS, then the CPU.
- Accelerators compute in float16 by default; the CPU in float32.
- float16 asked for on a CPU becomes bfloat16 (or float32 where the CPU lacks it), with a note: CPU
  convolutions have no half kernels (the `slow_conv2d_cpu not implemented for 'Half'` error).
- The original scripts' `--precision autocast` means "half precision on an accelerator"; `full` means float32.
Latents and sampler math stay float32 whatever is chosen here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class DeviceError(ValueError):
    """A device or dtype that cannot be used here; the message says what to do instead."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    notes: tuple[str, ...] = field(default=())  # what was changed from the request, and why


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX-512 BF16 or AMX on x86, BF16 on ARM). Elsewhere bf16 is emulated and
    slower than float32, so float32 is the better fallback."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # macOS and Windows: Apple silicon has bf16, Intel Macs do not
        import platform
        return platform.machine().lower() in ("arm64", "aarch64")
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_device(name: Union[str, torch.device, None] = "auto") -> torch.device:
    """A device from a name (`auto`, `cpu`, `cuda:1`, `mps`) or a torch.device, checked to be usable here."""
    name = str(name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda asked for, but this PyTorch sees no CUDA GPU; use --device cpu "
                          "(or install a CUDA build of PyTorch)")
    if device.type == "mps" and not _mps_available():
        raise DeviceError("--device mps asked for, but MPS is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """A compute dtype from a name (`float16`, `fp16`, `bf16`, ...) or a torch.dtype (`torch.float16`)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise DeviceError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16 (names or torch dtypes)")


def resolve(device: Union[str, torch.device, None] = "auto", dtype: Union[str, torch.dtype, None] = None,
            precision: Optional[str] = None) -> Placement:
    """Decide the device and the compute dtype once, from the user's flags or Python objects.

    `dtype` wins over `precision` (the original's `full|autocast`). Both None: the device's default."""
    dev = resolve_device(device)
    notes = []
    if dtype is not None:
        want = resolve_dtype(dtype)
    elif precision is not None:
        if precision not in ("full", "autocast"):
            raise DeviceError(f"unknown precision {precision!r}; use full or autocast")
        want = torch.float16 if precision == "autocast" and dev.type != "cpu" else torch.float32
    else:
        want = torch.float32 if dev.type == "cpu" else torch.float16
    if dev.type == "cpu" and want == torch.float16:
        want = torch.bfloat16 if cpu_has_bf16() else torch.float32
        notes.append(f"float16 is not supported for CPU convolutions; using {str(want).replace('torch.', '')} instead")
    elif dev.type == "cpu" and want == torch.bfloat16 and not cpu_has_bf16():
        notes.append("this CPU has no native bfloat16 (AVX-512 BF16, AMX or ARM BF16): bfloat16 runs emulated, "
                     "far slower than float32")
    if dev.type == "mps" and want == torch.bfloat16:
        want = torch.float16
        notes.append("bfloat16 is not supported on MPS; using float16 instead")
    return Placement(dev, want, tuple(notes))


def configure_backends(placement: Placement) -> None:
    """Float32 on CUDA means float32: cuDNN runs float32 convolutions in TF32 by default (10-bit
    mantissa), which moved a guided 10-step sample by 0.08 against the CPU (H200, tiny fixtures).
    Reproducible seeds across devices need the full precision, so it is switched off here, once."""
    if placement.device.type == "cuda" and placement.dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
