"""OpenCLIP text tower (SD 2.x's FrozenOpenCLIPEmbedder), in the open_clip key layout.

Keys match SD 2.x checkpoints with `cond_stage_model.model.` stripped, e.g.
`transformer.resblocks.22.attn.in_proj_weight` (q, k and v fused, as nn.MultiheadAttention stores
them). `text_projection` and `logit_scale` are in every checkpoint but SD 2.x never uses them; they
are kept so the load is strict. The causal mask is computed, never stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.clip_text import activation
from models.layers import embedding


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """OpenCLIP text tower in the open_clip layout (SD 2.x's FrozenOpenCLIPEmbedder). Defaults: ViT-H/14."""
    vocab_size: int = 49408
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    context_length: int = 77
    embed_dim: int = 1024  # text_projection output; stored in checkpoints, unused by SD 2.x
    act: str = "gelu"
    layer: str = "penultimate"  # SD 2.x runs all but the last block, then ln_final
    pad_token: int = 0  # open_clip.tokenize pads with 0


class FusedAttention(nn.Module):
    """Causal self-attention with nn.MultiheadAttention's parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (rearrange(y, "b t (h d) -> b h t d", h=self.heads) for y in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.attn = FusedAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = MLP(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """tokens [B, T<=77] -> hidden states [B, T, width].

    As FrozenOpenCLIPEmbedder.encode_with_transformer: token + positional embedding, every block
    ("last") or all but the last ("penultimate", SD 2.x), then ln_final in both cases.
    """

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        if cfg.layer not in ("last", "penultimate"):
            raise ValueError(f"OpenCLIP text layer {cfg.layer!r} is not supported (last, penultimate)")
        self.cfg = cfg
        self.token_embedding = embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=1e-5)
        self.text_projection = nn.Parameter(torch.zeros(cfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        blocks = self.transformer.resblocks
        for block in (blocks if self.cfg.layer == "last" else blocks[:-1]):
            x = block(x)
        return self.ln_final(x)

    def skipped_blocks(self) -> tuple:
        """The blocks `forward` never runs, built only so that every official key loads."""
        return () if self.cfg.layer == "last" else (self.transformer.resblocks[-1],)


def normalize_openclip_keys(sd: dict) -> dict:
    """Bring an OpenCLIP text state dict (prefix already stripped) into our layout.

    Drops `attn_mask` (a buffer that some re-saved files carry; it is only the causal mask) and
    removes the `text.` level of open_clip's CustomTextCLIP layout. Anything else passes through,
    so a strict load still reports real mismatches.
    """
    out = {}
    for k, v in sd.items():
        if k.rsplit(".", 1)[-1] == "attn_mask":
            continue
        if k.startswith("text."):
            k = k[len("text."):]
        out[k] = v
    return out
