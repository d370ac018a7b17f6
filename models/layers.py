"""The two pieces the UNet and the VAE share: float32 group norm and scaled dot-product attention."""
from __future__ import annotations

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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention over (B, T, heads * d) tensors, via F.scaled_dot_product_attention.

    In float16 the logits are computed in float32: SD 2.x's 768-v model overflows fp16 attention
    logits and produces black images otherwise (the original's `ATTN_PRECISION = "fp32"`).
    """
    b, tq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
    if q.dtype == torch.float16:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, tq, inner)
