"""The pieces the UNet and the VAE share: group norm with float32 statistics and scaled dot-product
attention with float32 logits in float16 (optionally sliced along the queries to bound its peak memory), on
the faster of two CPU kernels per shape, by a fixed rule."""
from __future__ import annotations

import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # PyTorch >= 2.3


# The CPU and CUDA kernels accumulate half-precision group norm and attention in float32 (CUDA's flash
# and memory-efficient attention keep fp32 logits and softmax; the CPU kernels upcast). MPS may not:
# there fp16 sums over 64x64x320 values or q.k logits can overflow (SD 2.1 768-v turns black), so the
# inputs are cast to float32 by hand. Casting everywhere would cost a full-size copy per call for
# nothing where the kernel already does it.
HALF_SUMS_IN_HALF = ("mps",)


def needs_upcast(t: torch.Tensor) -> bool:
    """Whether float16 math on this tensor's device must be done in float32 by hand."""
    return t.dtype == torch.float16 and t.device.type in HALF_SUMS_IN_HALF


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are float32 whatever the weights' dtype: fp16 statistics over
    64×64×320 values overflow and turn images black or noisy. Returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not needs_upcast(x):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, slices: int = 1) -> torch.Tensor:
    """Multi-head attention over (B, T, heads * d) tensors.

    In float16 the logits and softmax are float32 (SD 2.x's 768-v model overflows fp16 logits and
    produces black images otherwise; the original's `ATTN_PRECISION = "fp32"`): by the kernel on CPU and
    CUDA, by casting elsewhere.

    `slices` > 1 computes the queries in that many chunks, one after the other, so a backend that
    materialises the (heads, Tq, Tk) logits (MPS, the math kernel) holds about 1/slices of them at once.
    Each query row's softmax only sees its own logits, so slicing changes nothing but the peak memory.

    On the CPU, in float32 and bfloat16, each shape large enough to matter runs on the kernel
    `attention_choice` picks for it by a fixed rule (F.scaled_dot_product_attention, or batched matmuls in
    cache-sized query slices); everywhere else on F.scaled_dot_product_attention.
    """
    tq = q.shape[1]
    # Each head's features must be contiguous: given strided ones (the VAE's channel-major pixels), the CPU
    # kernel takes a path that holds every (Tq, Tk) logit, several times the memory and slower. A no-op for
    # the UNet's linear projections.
    q, k, v = (rearrange(t.contiguous(), "b t (h d) -> b h t d", h=heads) for t in (q, k, v))
    if needs_upcast(q):
        k, v = k.float(), v.float()

    def run(qs: torch.Tensor) -> torch.Tensor:
        return KERNELS[attention_choice(qs, k, v)](qs.to(k.dtype), k, v).to(qs.dtype)

    chunk = -(-tq // max(int(slices), 1))
    if chunk >= tq:
        out = run(q)
    else:
        out = torch.empty_like(q)
        for s in range(0, tq, chunk):
            out[:, :, s:s + chunk] = run(q[:, :, s:s + chunk])
    return rearrange(out, "b h t d -> b t (h d)")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused kernel on (B, H, T, d): on the CPU the flash kernel, float32 logits in any dtype."""
    return F.scaled_dot_product_attention(q, k, v)


# Bytes of logits one query slice of `matmul_attention` may hold: the core's L2, where the softmax reads
# what the first matmul wrote. 1 MiB where the OS does not say.
CACHE_BYTES = (os.sysconf("SC_LEVEL2_CACHE_SIZE") if hasattr(os, "sysconf") and "SC_LEVEL2_CACHE_SIZE"
               in os.sysconf_names else 0) or 2 ** 20


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, H, T, d) as two batched matmuls with the heads merged into the
    batch, in query slices whose logits fit in CACHE_BYTES (never fewer than 64 rows: below that the
    calls cost more than the cache saves). The logits are in the inputs' dtype (bfloat16 keeps float32's
    range; float16 never comes here) and the softmax is float32. Slicing changes no number."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    q, kt, v = q.reshape(b * h, tq, d), k.reshape(b * h, tk, d).transpose(1, 2), v.reshape(b * h, tk, d)
    rows = min(tq, max(64, CACHE_BYTES // (b * h * tk * 4)))
    out = torch.empty(b * h, tq, d, dtype=q.dtype, device=q.device)
    scale = d ** -0.5
    for s in range(0, tq, rows):
        logits = torch.baddbmm(out.new_empty(1, 1, 1), q[:, s:s + rows], kt, beta=0, alpha=scale)
        torch.bmm(torch.softmax(logits, -1, dtype=torch.float32).to(q.dtype), v, out=out[:, s:s + rows])
    return out.view(b, h, tq, d)


KERNELS = {"flash": flash_attention, "matmul": matmul_attention}
DEFAULT = "flash"
# Shapes below this much work (B*H*Tq*Tk*d) take the default: no choice could save anything there (the text
# towers, tiny test models).
TUNE_MIN_WORK = 2 ** 24
# Keys up to this many are a cross-attention over a text context (77 tokens per chunk).
CROSS_KEYS = 160
# In `_fastest`, the other option must beat the default by this factor, so timing noise keeps the default.
TUNE_MARGIN = 0.9
_choices: dict = {}


def _rule(q: torch.Tensor, k: torch.Tensor) -> str:
    """The kernel for a shape, by what tools/bench_attention.py measured (README, "Memory and speed"): PyTorch's
    flash kernel won every bfloat16 shape and float32 self-attention; the sliced matmuls won float32
    cross-attention over a text context by about 20%. A rule and not a timing taken at run time: a timed
    choice can fall either way between two runs on one machine, and then the same seed gives other bytes."""
    return "matmul" if q.dtype == torch.float32 and k.shape[2] <= CROSS_KEYS else DEFAULT


def attention_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The name in KERNELS that computes attention on these (B, H, T, d) tensors: on the CPU in float32
    and bfloat16 by `_rule`, remembered per shape (`_choices`); the default elsewhere, under the compiler and
    where gradients flow."""
    b, h, tq, d = q.shape
    if (q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != q.dtype
            or b * h * tq * k.shape[2] * d < TUNE_MIN_WORK or _compiling()
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return DEFAULT
    key = (q.dtype, b, h, tq, k.shape[2], d, torch.get_num_threads())
    name = _choices.get(key)
    if name is None:
        if len(_choices) > 256:  # shapes of many image sizes: a bounded cache, remade as needed
            _choices.clear()
        name = _choices[key] = _rule(q, k)
    return name


def _fastest(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel that runs these tensors fastest here (tools/bench_attention.py: what `_rule` was read from)."""
    with torch.no_grad():
        best = {}
        for name, kernel in KERNELS.items():
            kernel(q, k, v)  # the first call sets up oneDNN's primitives
            times = []
            for _ in range(3):
                start = time.perf_counter()
                kernel(q, k, v)
                times.append(time.perf_counter() - start)
            best[name] = min(times)
    fastest = min(best, key=best.get)
    return fastest if best[fastest] < TUNE_MARGIN * best[DEFAULT] else DEFAULT


def attention_choices() -> dict:
    """What `attention_choice` decided so far: {(dtype, B, H, Tq, Tk, d, threads): kernel name}."""
    return dict(_choices)


def set_attention_slicing(module: nn.Module, slices: Optional[int]) -> int:
    """Compute every attention layer inside `module` (a UNet, a VAE) in `slices` query chunks; None, 0
    or 1 switches slicing off. The setting lives on each layer's `attention_slices`, so two models in
    one process keep their own. Returns how many layers were set."""
    n = 1 if not slices else int(slices)
    if n < 1:
        raise ValueError(f"attention slicing needs a positive number of slices, got {slices}")
    layers = [m for m in module.modules() if hasattr(m, "attention_slices")]
    for m in layers:
        m.attention_slices = n
    return len(layers)


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding without its random init: the weights always come from a checkpoint, and a normal_()
    on the meta device drags in torch._dynamo (seconds of the first load)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
