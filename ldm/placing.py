"""Putting a loaded network's tensors on the compute device and dtype, one tensor at a time.

Each tensor is converted on its own and its memory-mapped original handed back at once (weights/pages.py),
so a checkpoint is never resident next to its converted copy. Parts a command never runs are left as the
file's tensors until their first call.
"""
from __future__ import annotations

import torch
from torch import nn

from .device import Placement

_HALVES = (torch.float16, torch.bfloat16)
_CHUNK = 1 << 20


def place(module: nn.Module, placement: Placement, release, later: tuple = ()) -> nn.Module:
    """Move tensor by tensor to the compute device and dtype, handing each mapped original's pages back
    as soon as it is copied, so the file is never resident next to its converted copy. A tensor that is
    already right (a float32 file used as float32 on the CPU) is not copied: it stays memory-mapped.

    Submodules in `later` are moved on their first call instead, so a part that a command never runs
    (the VAE's encoder in txt2img, SD 2's last text block) is never converted nor sent to the GPU."""
    deferred = {id(m) for part in later for m in part.modules()}
    scratch = torch.empty(_CHUNK, dtype=torch.float32)  # one per tensor would fragment the heap
    for mod in module.modules():
        if id(mod) in deferred:
            continue
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                dtype = placement.dtype if t.is_floating_point() else t.dtype
                if t.device == placement.device and t.dtype == dtype:
                    continue
                moved = converted(t.detach(), placement.device, dtype, scratch)
                table[name] = nn.Parameter(moved, requires_grad=False) if table is mod._parameters else moved
                release(t)
    for part in later:
        _place_on_first_call(part, placement, release)
    return module.eval().requires_grad_(False)


def converted(t: torch.Tensor, device: torch.device, dtype: torch.dtype, scratch: torch.Tensor) -> torch.Tensor:
    """t on `device` in `dtype`; on the CPU float16 <-> bfloat16 goes through `scratch`, float32, 1M values
    at a time, because PyTorch's direct half-to-half cast is far slower than the two casts through float32
    that replace it (the figures are in the README)."""
    if device.type != "cpu" or t.dtype == dtype:
        return t.to(device=device, dtype=dtype)
    out = torch.empty(t.shape, dtype=dtype)
    if not (t.dtype in _HALVES and dtype in _HALVES and t.is_contiguous()):
        return out.copy_(t)
    src, dst = t.view(-1), out.view(-1)
    for s in range(0, src.numel(), _CHUNK):
        part = scratch[:min(_CHUNK, src.numel() - s)]
        dst[s:s + _CHUNK].copy_(part.copy_(src[s:s + _CHUNK]))
    return out


def _place_on_first_call(part: nn.Module, placement: Placement, release) -> None:
    def on_first_call(*_):
        handle.remove()
        del part.pending_placement
        place(part, placement, release)

    handle = part.register_forward_pre_hook(on_first_call)
    part.pending_placement = on_first_call


def place_now(module: nn.Module) -> None:
    """Move the parts `load` left for their first call now (before copying the tensors elsewhere, as
    offloading does)."""
    for mod in list(module.modules()):
        if hasattr(mod, "pending_placement"):
            mod.pending_placement()
