"""DDPM ancestral sampling: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", Alg. 2,
on a strided sub-sequence of timesteps (the DDIM/PLMS ones, `ddim_timesteps`).

Each step samples the posterior q(x_{t'} | x_t, x̂0) (eq. 6-7) of the strided chain t -> t' (t' the
next timestep down), whose β is β_t = 1 - ᾱ_t / ᾱ_{t'} and α_t = 1 - β_t:
    μ = √ᾱ_{t'} β_t / (1 - ᾱ_t) x̂0 + √α_t (1 - ᾱ_{t'}) / (1 - ᾱ_t) x_t
    σ² = β̃_t = (1 - ᾱ_{t'}) / (1 - ᾱ_t) β_t                    ("fixed small", the true posterior variance)
    x_{t'} = μ + σ z
Algebraically this is DDIM with η = 1 (Song et al. 2021 eq. 16 gives the same σ, and eq. 12's mean
rewritten with ε̂ = (x_t - √ᾱ_t x̂0)/√(1-ᾱ_t) is μ). What differs is the end: as Alg. 2 (z = 0 at t = 1,
ᾱ = 1 after it), the last step lands on ᾱ_{t'} = 1, i.e. x_next = x̂0 with no noise, where DDIM stops at
ᾱ_0 as the original. This is diffusers' `DDPMScheduler(variance_type="fixed_small")` with "leading"
spacing and steps_offset=1.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .denoiser import Denoise
from .noise import Generators, noise_like
from .schedule import DDIMSchedule
from .step import Step


def ddpm_update(pred_x0: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor,
                noise: torch.Tensor | None) -> torch.Tensor:
    """x_{t'} = μ̃(x_t, x̂0) + √β̃ z of eq. 6-7 for the strided step ᾱ_t -> ᾱ_{t'} (no noise when None)."""
    beta = 1 - alpha / alpha_prev
    mean = (alpha_prev.sqrt() * beta * pred_x0 + (1 - beta).sqrt() * (1 - alpha_prev) * x) / (1 - alpha)
    if noise is None:
        return mean
    return mean + ((1 - alpha_prev) / (1 - alpha) * beta).sqrt() * noise


def ddpm_steps(denoise: Denoise, x: torch.Tensor, schedule: DDIMSchedule, *,
               generator: Generators = None) -> Iterator[Step]:
    """Yield one `Step` per DDPM step (one UNet call, one noise draw but on the last step).

    Same `schedule` as `ddim_steps`. The last step's `x_next` is x̂0 (ᾱ = 1); its `t_next` is reported as 0.
    """
    n, ts = len(schedule), schedule.timesteps.tolist()
    alphas = schedule.alphas.to(x.device)
    alphas_prev = torch.cat([alphas.new_ones(1), alphas[:-1]])   # ᾱ = 1 below the first timestep
    x = x.to(torch.float32)
    for i in range(n):
        k = n - 1 - i   # schedule index, from the top down
        eps, pred_x0 = denoise(x, ts[k])
        noise = noise_like(x, generator) if k else None
        x_next = ddpm_update(pred_x0, x, alphas[k], alphas_prev[k], noise)
        step = Step(index=i, total=n, t=ts[k], t_next=ts[k - 1] if k else 0, x=x, eps=eps, pred_x0=pred_x0,
                    x_next=x_next)
        yield step
        x = step.x_next
