"""Euler and Euler ancestral in sigma space (k-diffusion `sample_euler`, `sample_euler_ancestral`).

Euler: Karras et al. 2022, Alg. 2 without its second-order correction: one evaluation of the
probability-flow ODE dx/dσ = (x - D(x; σ)) / σ per step, x_next = x̂ + (σ_next - σ̂) d, with the optional
"churn" of lines 4-7 (S_churn = 0: plain Euler, deterministic).
Euler ancestral: the Euler step to σ_down, then fresh noise of std σ_up (`get_ancestral_step`), so each
step ends at σ_next with DDPM-like stochasticity (η = 1; η = 0 is plain Euler).

Shared signature of sigma-space samplers: `(denoise, x, sigmas, *, generator=None, ...)`, with
`denoise(x, sigma) -> (eps, pred_x0)` and x already at σ_0 (x0 + σ_0 z, or σ_0 z for txt2img).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .denoiser import SigmaDenoise
from .noise import Generators
from .sigmas import add_ancestral_noise, as_floats, churn, get_ancestral_step, to_d
from .step import Step

INF = float("inf")


def euler_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = INF,
                s_noise: float = 1.0) -> Iterator[Step]:
    """One UNet call per step: x_next = x̂ + (σ_next - σ̂) (x̂ - D(x̂; σ̂)) / σ̂."""
    sig = as_floats(sigmas)
    n = len(sig) - 1
    x = x.to(torch.float32)
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        x_hat, sigma_hat = churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, generator)
        eps, x0 = denoise(x_hat, sigma_hat)
        x_next = x_hat + to_d(x_hat, sigma_hat, x0) * (sigma_next - sigma_hat)
        step = Step(index=i, total=n, sigma=sigma, sigma_next=sigma_next, x=x, eps=eps, pred_x0=x0, x_next=x_next)
        yield step
        x = step.x_next


def euler_ancestral_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                          generator: Generators = None, eta: float = 1.0,
                          s_noise: float = 1.0) -> Iterator[Step]:
    """One UNet call per step: Euler to σ_down, then + σ_up z (one draw per step but the last)."""
    sig = as_floats(sigmas)
    n = len(sig) - 1
    x = x.to(torch.float32)
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        eps, x0 = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x_next = add_ancestral_noise(x + to_d(x, sigma, x0) * (sigma_down - sigma), sigma_up, generator, s_noise)
        step = Step(index=i, total=n, sigma=sigma, sigma_next=sigma_next, x=x, eps=eps, pred_x0=x0, x_next=x_next)
        yield step
        x = step.x_next
