"""A cheap look at a latent without the VAE: one 4x3 matrix (plus a bias) from latent channels to RGB.

The matrix is fitted by least squares on VAE decodes: decode some latents, average-pool each decode
down to the latent grid (f x f pixels per latent pixel), and solve [z, 1] @ W = rgb over all latent
pixels. Fitted on the latents being looked at (their `pred_x0`s), it is the best linear stand-in for the
decoder on exactly those images; `fit.rms` says how far from the decodes it stays (in [-1, 1] units).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LatentRGB:
    weight: torch.Tensor  # (C, 3)
    bias: torch.Tensor    # (3,)
    rms: float            # RMS error of the fit against the pooled decodes, images in [-1, 1]

    def __call__(self, latents: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> preview images (B, 3, h*scale, w*scale) in [-1, 1]."""
        rgb = torch.einsum("bchw,cd->bdhw", latents.float().cpu(), self.weight) + self.bias[:, None, None]
        if scale > 1:
            rgb = F.interpolate(rgb, scale_factor=scale, mode="nearest")
        return rgb.clamp(-1, 1)


def fit_latent_rgb(latents: torch.Tensor, decoded: torch.Tensor) -> LatentRGB:
    """Least-squares 4x3 (+bias) map from scaled latents (B, C, h, w) to their decodes (B, 3, H, W)."""
    f = decoded.shape[-1] // latents.shape[-1]
    target = F.avg_pool2d(decoded.float().cpu(), f)  # (B, 3, h, w): what each latent pixel decodes to, on average
    z = latents.float().cpu().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    a = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    solution = torch.linalg.lstsq(a.double(), y.double()).solution.float()
    weight, bias = solution[:-1], solution[-1]
    rms = ((a @ solution - y) ** 2).mean().sqrt().item()
    return LatentRGB(weight, bias, rms)
