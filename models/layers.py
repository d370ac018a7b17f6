"""The pieces the UNet and the VAE share: group norm with float32 statistics and scaled dot-product
attention with float32 logits (optionally sliced along the queries to bound its peak memory)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


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
    """Multi-head attention over (B, T, heads * d) tensors, via F.scaled_dot_product_attention.

    In float16 the logits and softmax are float32 (SD 2.x's 768-v model overflows fp16 logits and
    produces black images otherwise; the original's `ATTN_PRECISION = "fp32"`): by the kernel on CPU and
    CUDA, by casting elsewhere.

    `slices` > 1 computes the queries in that many chunks, one after the other, so a backend that
    materialises the (heads, Tq, Tk) logits (MPS, the math kernel) holds about 1/slices of them at once.
    Each query row's softmax only sees its own logits, so slicing changes nothing but the peak memory.
    """
    tq = q.shape[1]
    # Each head's features must be contiguous: given strided ones (the VAE's channel-major pixels), the CPU
    # kernel takes a path that holds every (Tq, Tk) logit, several times the memory and slower. A no-op for
    # the UNet's linear projections.
    q, k, v = (rearrange(t.contiguous(), "b t (h d) -> b h t d", h=heads) for t in (q, k, v))
    if needs_upcast(q):
        k, v = k.float(), v.float()

    def sdpa(qs: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(qs.to(k.dtype), k, v).to(qs.dtype)

    chunk = -(-tq // max(int(slices), 1))
    if chunk >= tq:
        out = sdpa(q)
    else:
        out = torch.empty_like(q)
        for s in range(0, tq, chunk):
            out[:, :, s:s + chunk] = sdpa(q[:, :, s:s + chunk])
    return rearrange(out, "b h t d -> b t (h d)")


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
