"""DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12.

    x_{t-1} = √ᾱ_{t-1} x̂0 + √(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z,   z ~ N(0, I)

with σ_t = η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t-1}) (eq. 16): η = 0 is deterministic DDIM,
η = 1 is DDPM-like ancestral sampling. Timesteps and coefficients are the original's
(`samplers.schedule.ddim_schedule`), so the last step lands on ᾱ_0, not on 1.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .denoiser import Denoise
from .noise import Generators, noise_like
from .schedule import ddim_schedule
from .step import Step, drain


def ddim_update(pred_x0: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor, sigma: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """Eq. 12: "predicted x0" + "direction pointing to x_t" + "random noise"."""
    dir_xt = (1.0 - alpha_prev - sigma ** 2).sqrt() * eps
    return alpha_prev.sqrt() * pred_x0 + dir_xt + sigma * noise


def _check_t_start(t_start: int | None, n: int) -> int:
    if t_start is None:
        return n
    if not 0 <= t_start <= n:
        raise ValueError(f"t_start must be in 0..{n}, got {t_start}")
    return t_start


def ddim_steps(denoise: Denoise, x: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int, *,
               eta: float = 0.0, generator: Generators = None,
               t_start: int | None = None) -> Iterator[Step]:
    """Yield one `Step` per DDIM step, from x at the top of the schedule down to t = 0.

    t_start: run only the last `t_start` steps (timesteps[t_start-1] down to timesteps[0]), the
    original's `DDIMSampler.decode(x, cond, t_start)` used by img2img.
    Noise is drawn every step, even when η = 0 (then multiplied by 0), so the RNG stream advances
    exactly as in the original sampler.
    """
    sched = ddim_schedule(alphas_cumprod, num_steps, eta)
    n = _check_t_start(t_start, len(sched))
    ts = sched.timesteps.tolist()
    alphas_prev, sigmas = sched.alphas_prev.to(x.device), sched.sigmas.to(x.device)
    x = x.to(torch.float32)
    for i, k in enumerate(reversed(range(n))):
        eps, pred_x0 = denoise(x, ts[k])
        x_next = ddim_update(pred_x0, eps, alphas_prev[k], sigmas[k], noise_like(x, generator))
        step = Step(i, n, ts[k], ts[k - 1] if k else 0, x, eps, pred_x0, x_next)
        yield step
        x = step.x_next


def ddim_sample(denoise: Denoise, x: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int,
                **kwargs) -> torch.Tensor:
    """`ddim_steps` run to the end: the final latent."""
    return drain(ddim_steps(denoise, x, alphas_cumprod, num_steps, **kwargs), x.to(torch.float32))


def stochastic_encode(x0: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int, t_enc: int,
                      noise: torch.Tensor | None = None,
                      generator: Generators = None) -> torch.Tensor:
    """Noise a clean latent to DDIM step `t_enc`: √ᾱ x0 + √(1-ᾱ) z with ᾱ = ddim alphas[t_enc].

    As the original `DDIMSampler.stochastic_encode(x0, t_enc)` (use_original_steps=False). Note
    the original img2img then decodes with `t_start = t_enc`, whose first step is at
    timesteps[t_enc - 1]: the latent is noised one DDIM step above where denoising starts.
    We keep that, since it is what the original images are made of.
    noise: when None, drawn like the samplers' noise (`noise_like`, float32 on the CPU generator).
    """
    sched = ddim_schedule(alphas_cumprod, num_steps)
    if not 0 <= t_enc < len(sched):
        raise ValueError(f"t_enc must be in 0..{len(sched) - 1}, got {t_enc}")
    x0 = x0.to(torch.float32)
    if noise is None:
        noise = noise_like(x0, generator)
    alpha = sched.alphas[t_enc].to(x0.device)
    return alpha.sqrt() * x0 + (1.0 - alpha).sqrt() * noise.to(x0.device, torch.float32)
