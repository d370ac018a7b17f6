"""The KL autoencoder (`ldm.models.autoencoder.AutoencoderKL`), inference only.

Module names mirror the official `first_stage_model.*` keys, so a checkpoint's VAE weights load with
`strict=True` once that prefix is stripped. Images are in [-1, 1]; `decode` takes UNSCALED latents
(the diffusion model's latents divided by its `scale_factor`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.config import VAEConfig
from models.layers import GroupNorm32, attention
from models.tiling import Tiling, tiled


def Normalize(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One statement per step and in-place activations, so at most three full-size tensors are alive
        # at once (four otherwise): at 1024x1024 each is 537 MB.
        h = F.silu(self.norm1(x), inplace=True)
        h = self.conv1(h)
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return h.add_(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w pixels, with 1x1 convolutions as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.attention_slices = 1  # models.layers.set_attention_slicing
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = self.norm(x)
        q, k, v = (rearrange(m(y), "b c h w -> b (h w) c") for m in (self.q, self.k, self.v))
        out = rearrange(attention(q, k, v, heads=1, slices=self.attention_slices), "b (h w) c -> b c h w", h=h, w=w)
        return self.proj_out(out).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original pads right/bottom only; symmetric padding would shift the latent grid by a pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1 = ResnetBlock(channels, channels), AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, c_in = cfg.resolution, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            # Attention placement follows the config's nominal resolution, not the input's size.
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(c_out) for _ in blocks] if res in cfg.attn_resolutions else []
            level, c_in = _level(blocks, attns), c_out
            if i != len(cfg.ch_mult) - 1:
                level.downsample, res = Downsample(c_out), res // 2
            self.down.append(level)
        self.mid = _mid(c_in)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsampling_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):  # built lowest resolution first; `up.0` is the highest
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(c_out) for _ in blocks] if res in cfg.attn_resolutions else []
            level, c_in = _level(blocks, attns), c_out
            if i != 0:
                level.upsample, res = Upsample(c_out), res * 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class DiagonalGaussian:
    """The posterior q(z | image): a Gaussian with diagonal covariance."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None,
               noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mean + std * noise; `noise` (standard normal) is drawn from `generator` when not given."""
        if noise is None:
            # Drawn on the CPU in float32 so one seed gives the same latent on every device and dtype.
            noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.tiling: Optional[Tiling] = None  # models.tiling.enable_vae_tiling

    def _moments(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        if self.tiling is None:
            return DiagonalGaussian(self._moments(images))
        return DiagonalGaussian(tiled(self._moments, images, self.tiling, self.cfg.downsampling_factor, 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.tiling is None:
            return self._decode(z)
        return tiled(self._decode, z, self.tiling, 1, self.cfg.downsampling_factor)
