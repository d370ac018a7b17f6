"""The two pieces the UNet and the VAE share: float32 group norm and scaled dot-product attention
(optionally sliced along the queries to bound its peak memory)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the weights' dtype: fp16 statistics over 64×64×320
    values overflow and turn images black or noisy. Returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, slices: int = 1) -> torch.Tensor:
    """Multi-head attention over (B, T, heads * d) tensors, via F.scaled_dot_product_attention.

    In float16 the logits are computed in float32: SD 2.x's 768-v model overflows fp16 attention
    logits and produces black images otherwise (the original's `ATTN_PRECISION = "fp32"`).

    `slices` > 1 computes the queries in that many chunks, one after the other, so a backend that
    materialises the (heads, Tq, Tk) logits (MPS, the math kernel) holds about 1/slices of them at once.
    Each query row's softmax only sees its own logits, so slicing changes nothing but the peak memory.
    """
    b, tq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
    if q.dtype == torch.float16:
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
    return out.transpose(1, 2).reshape(b, tq, inner)


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
    on the meta device drags in torch._dynamo (2-3 s of the first load)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
