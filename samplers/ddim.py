"""DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12.

    x_{t-1} = √ᾱ_{t-1} x̂0 + √(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z,   z ~ N(0, I)

with σ_t = η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t-1}) (eq. 16, `schedule.ddim_sigmas`): η = 0 is
deterministic DDIM, η = 1 is DDPM-like ancestral sampling. Timesteps and coefficients are the
original's (`samplers.schedule.ddim_schedule`), so the last step lands on ᾱ_0, not on 1.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .denoiser import Denoise
from .noise import Generators, noise_like
from .schedule import DDIMSchedule, ddim_sigmas
from .step import Step


def ddim_update(pred_x0: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor, sigma: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """Eq. 12: "predicted x0" + "direction pointing to x_t" + "random noise"."""
    dir_xt = (1.0 - alpha_prev - sigma ** 2).sqrt() * eps
    return alpha_prev.sqrt() * pred_x0 + dir_xt + sigma * noise


def ddim_steps(denoise: Denoise, x: torch.Tensor, schedule: DDIMSchedule, *, generator: Generators = None,
               eta: float = 0.0) -> Iterator[Step]:
    """Yield one `Step` per DDIM step, from x at the top of `schedule` down to t = 0.

    schedule: `ddim_schedule(alphas_cumprod, num_steps)`, or its first t_start steps for img2img
    (the original's `DDIMSampler.decode(x, cond, t_start)`; see `schedule.ddim_start`).
    Noise is drawn every step, even when η = 0 (then multiplied by 0), so the RNG stream advances
    exactly as in the original sampler.
    """
    n, ts = len(schedule), schedule.timesteps.tolist()
    alphas_prev, sigmas = schedule.alphas_prev.to(x.device), ddim_sigmas(schedule, eta).to(x.device)
    x = x.to(torch.float32)
    for i in range(n):
        k = n - 1 - i   # schedule index, from the top down
        eps, pred_x0 = denoise(x, ts[k])
        x_next = ddim_update(pred_x0, eps, alphas_prev[k], sigmas[k], noise_like(x, generator))
        step = Step(index=i, total=n, t=ts[k], t_next=ts[k - 1] if k else 0, x=x, eps=eps, pred_x0=pred_x0,
                    x_next=x_next)
        yield step
        x = step.x_next
