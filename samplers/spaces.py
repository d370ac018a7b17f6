"""What a sampler's space decides around it, in one place: the denoiser it calls and where it starts.

    spec = resolve_sampler("euler_a")
    denoise = denoiser_for(spec, unet, cond, uncond, scale, parameterization, alphas_cumprod)
    x, schedule = start_for(spec, noise, alphas_cumprod, num_steps)                        # txt2img
    x, schedule = start_for(spec, noise, alphas_cumprod, num_steps, x0=latent, t_start=k)  # img2img
    for step in spec.fn(denoise, x, schedule, generator=generator): ...

alpha space   denoise(x, t) on integer timesteps (`make_denoiser`); the schedule is the original's
              `ddim_schedule`, started by `schedule.ddim_start` (x_T = noise, or the stochastic encode).
sigma space   denoise(x, σ) (`make_sigma_denoiser`); the schedule is `get_sigmas(..., spec.schedule)`,
              started by `sigmas.sigma_start` (σ_0 noise, or x0 + σ_0 noise).
`noise` is unit variance (e.g. `noise.randn(shape, generator)`) in both.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .denoiser import make_denoiser, make_sigma_denoiser
from .registry import SamplerSpec
from .schedule import DDIMSchedule, ddim_schedule, ddim_start
from .sigmas import get_sigmas, sigma_start


def denoiser_for(spec: SamplerSpec, model: Callable, cond: Any, uncond: Any, scale: float, parameterization: str,
                 alphas_cumprod: torch.Tensor, *, dtype: torch.dtype | None = None,
                 quantize: bool = False) -> Callable:
    """The guided denoiser `spec.fn` calls: on timesteps (alpha space) or on noise levels (sigma space;
    `quantize` rounds t(σ) to the nearest training timestep)."""
    if spec.space == "sigma":
        return make_sigma_denoiser(model, cond, uncond, scale, parameterization, alphas_cumprod,
                                   dtype=dtype, quantize=quantize)
    return make_denoiser(model, cond, uncond, scale, parameterization, alphas_cumprod, dtype=dtype)


def start_for(spec: SamplerSpec, noise: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int, *,
              x0: torch.Tensor | None = None,
              t_start: int | None = None) -> tuple[torch.Tensor, DDIMSchedule | torch.Tensor]:
    """(x, schedule) for `spec.fn`: a `num_steps` run from unit `noise` (txt2img), or from `x0` noised for
    its last `t_start` steps (img2img)."""
    if x0 is not None and t_start is None:
        raise ValueError("img2img needs t_start, the number of steps to run")
    noise = noise.to(device=x0.device if x0 is not None else noise.device, dtype=torch.float32)
    if spec.space == "alpha":
        return ddim_start(noise, ddim_schedule(alphas_cumprod, num_steps), x0, t_start)
    return sigma_start(noise, get_sigmas(alphas_cumprod, num_steps, spec.schedule or "discrete"), x0, t_start)
