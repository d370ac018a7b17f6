"""Heun's second-order method in sigma space: Karras et al. 2022, Alg. 2 (k-diffusion `sample_heun`).

Each step takes the Euler step to σ_next, evaluates the ODE there and moves with the average of the
two slopes (the trapezoidal rule), two UNet calls per step; the last step, to σ = 0, where the slope
is undefined, stays an Euler step (Alg. 2 lines 9-12, `euler_to_zero`). Optional churn (lines 4-7)
as `euler_steps`.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .denoiser import SigmaDenoise
from .noise import Generators
from .sigmas import as_floats, churn, euler_to_zero, to_d
from .step import Step


def heun_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
               s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
               s_noise: float = 1.0) -> Iterator[Step]:
    """2 UNet calls per step, 1 for the last one: 2n - 1 in all."""
    sig = as_floats(sigmas)
    n = len(sig) - 1
    x = x.to(torch.float32)
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        x_hat, sigma_hat = churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, generator)
        eps, x0 = denoise(x_hat, sigma_hat)
        if sigma_next == 0:
            x_next = euler_to_zero(x_hat, sigma_hat, x0)
        else:
            d, dt = to_d(x_hat, sigma_hat, x0), sigma_next - sigma_hat
            x_euler = x_hat + d * dt
            _, x0_euler = denoise(x_euler, sigma_next)
            x_next = x_hat + (d + to_d(x_euler, sigma_next, x0_euler)) / 2 * dt
        step = Step(index=i, total=n, sigma=sigma, sigma_next=sigma_next, x=x, eps=eps, pred_x0=x0, x_next=x_next)
        yield step
        x = step.x_next
