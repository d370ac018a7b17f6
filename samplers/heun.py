"""Heun's second-order method in sigma space: Karras et al. 2022, Alg. 2 (k-diffusion `sample_heun`).

Each step takes the Euler step to σ_next, evaluates the ODE there and moves with the average of the
two slopes (the trapezoidal rule), two UNet calls per step; the last step, to σ = 0, where the slope
is undefined, stays an Euler step (Alg. 2 lines 9-12). Optional churn (lines 4-7) as `euler_steps`.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .denoiser import SigmaDenoise
from .noise import Generators
from .sigmas import churn, to_d
from .step import Step, sigma_loop


def heun_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
               s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
               s_noise: float = 1.0) -> Iterator[Step]:
    """2 UNet calls per step, 1 for the last one: 2n - 1 in all."""
    n = len(sigmas) - 1

    def update(i, x, sigma, sigma_next):
        x, sigma_hat = churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, generator)
        eps, x0 = denoise(x, sigma_hat)
        d, dt = to_d(x, sigma_hat, x0), sigma_next - sigma_hat
        x_euler = x + d * dt
        if sigma_next == 0:
            return eps, x0, x_euler
        _, x0_2 = denoise(x_euler, sigma_next)
        return eps, x0, x + (d + to_d(x_euler, sigma_next, x0_2)) / 2 * dt

    return sigma_loop(x, sigmas, update)
