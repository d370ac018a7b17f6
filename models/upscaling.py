"""The x4 upscaler's `low_scale_model`: the low-resolution image forward-noised to a chosen noise level on
its own schedule (`ImageConcatWithNoiseAugmentation` of the original `diffusionmodules/upscaling.py`).

The noised image is what the UNet sees concatenated to its latent (`c_concat`), and the level is its class
label (`y`): the model was trained on low-res images degraded that way, so a level of 0..350 tells it how
much of the input to trust. Buffer names are the checkpoint's `low_scale_model.*` keys.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
           "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")


def _schedule(linear_start: float, linear_end: float, timesteps: int) -> dict[str, torch.Tensor]:
    """`AbstractLowScaleModel.register_schedule` ("linear"): float64 math, each buffer cast to float32 once."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    values = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": torch.cat([ac.new_ones(1), ac[:-1]]),
              "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
              "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
              "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt()}
    return {k: v.to(torch.float32) for k, v in values.items()}


class ImageConcatWithNoiseAugmentation(nn.Module):
    """`forward(x, noise_level)` -> (√ᾱ_l x + √(1-ᾱ_l) z, noise_level), float32, as the original's q_sample.

    Built with the config's schedule; an official file's own buffers replace it (`load_state_dict`).
    The buffers stay float32 whatever the model's compute dtype: they are a table, not weights."""

    def __init__(self, linear_start: float = 1e-4, linear_end: float = 2e-2, timesteps: int = 1000,
                 max_noise_level: int = 1000, beta_schedule: str = "linear"):
        super().__init__()
        if beta_schedule != "linear":
            raise ValueError(f"the low-res noise schedule {beta_schedule!r} is not supported (only 'linear', as "
                             "every official upscaler config)")
        self.max_noise_level = int(max_noise_level)
        for name, value in _schedule(linear_start, linear_end, timesteps).items():
            self.register_buffer(name, value)

    @classmethod
    def from_config(cls, params: dict) -> "ImageConcatWithNoiseAugmentation":
        """From the YAML's `low_scale_config.params` ({noise_schedule_config: {...}, max_noise_level})."""
        schedule = dict(params.get("noise_schedule_config") or {})
        return cls(max_noise_level=params.get("max_noise_level", 1000), **schedule)

    def forward(self, x: torch.Tensor, noise_level: Optional[torch.Tensor] = None, *,
                noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] in [-1, 1]; noise_level: [B] integers (None: drawn in 0..max_noise_level-1, the
        original's first draw); noise: unit noise of x's shape (None: drawn from `generator` on the CPU, the
        original's `randn_like`, after the level)."""
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), generator=generator)
        noise_level = noise_level.to(device=x.device, dtype=torch.long)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        a = self.sqrt_alphas_cumprod.to(x.device)[noise_level].reshape(-1, 1, 1, 1)
        b = self.sqrt_one_minus_alphas_cumprod.to(x.device)[noise_level].reshape(-1, 1, 1, 1)
        return a * x.float() + b * noise.to(x.device, torch.float32), noise_level
