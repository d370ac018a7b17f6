"""CLIP text tower (SD 1.x's FrozenCLIPEmbedder), in the Hugging Face `CLIPTextModel` key layout.

Keys match official SD 1.x checkpoints with `cond_stage_model.transformer.` stripped, e.g.
`text_model.encoder.layers.11.mlp.fc2.weight`. `text_model.embeddings.position_ids` is deliberately
not a buffer: it is only `arange(77)`, and whether a file carries it depends on the transformers
version that saved it (see `normalize_clip_keys`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.layers import embedding


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower in the Hugging Face layout (SD 1.x's FrozenCLIPEmbedder). Defaults: ViT-L/14."""
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 77
    act: str = "quick_gelu"
    layer: str = "last"  # "last" or "penultimate" (clip skip 2)
    pad_token: int = 49407  # <|endoftext|>: the CLIPTokenizer's pad token, whatever config.json's pad_token_id says

    @property
    def context_length(self) -> int:
        return self.max_positions


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    """`quick_gelu` (OpenAI CLIP) or `gelu` (erf) by config name."""
    acts = {"quick_gelu": quick_gelu, "gelu": F.gelu}
    if name not in acts:
        raise ValueError(f"unknown text encoder activation {name!r}; known: {', '.join(acts)}")
    return acts[name]


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(p(x), "b t (h d) -> b h t d", h=self.heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = CLIPMLP(cfg.width, cfg.intermediate_size, cfg.act)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = embedding(cfg.max_positions, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=1e-5)


class CLIPTextModel(nn.Module):
    """tokens [B, T<=77] -> hidden states [B, T, width].

    layer "last": last block, then final_layer_norm (SD 1.x). "penultimate": the second-to-last
    block's output, then final_layer_norm (A1111's "clip skip 2"); the last block is still built so
    that every official key loads.
    """

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.layer not in ("last", "penultimate"):
            raise ValueError(f"CLIP text layer {cfg.layer!r} is not supported (last, penultimate)")
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tm = self.text_model
        x = tm.embeddings(tokens)
        layers = tm.encoder.layers if self.cfg.layer == "last" else tm.encoder.layers[:-1]
        for layer in layers:
            x = layer(x)
        return tm.final_layer_norm(x)

    def skipped_blocks(self) -> tuple:
        """The blocks `forward` never runs, built only so that every official key loads."""
        return () if self.cfg.layer == "last" else (self.text_model.encoder.layers[-1],)


def normalize_clip_keys(sd: dict) -> dict:
    """Bring a CLIP text state dict (prefix already stripped) into our layout.

    Accepts the variants in circulation: with the `text_model.` level (official SD 1.x files,
    transformers < 5) or without it (re-saved by transformers 5.x), and with or without
    `embeddings.position_ids` (a persistent buffer up to transformers 4.30 only). Anything else is
    passed through unchanged, so a strict load still reports real mismatches.
    """
    out = {}
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):
            continue
        if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            k = "text_model." + k
        out[k] = v
    return out
