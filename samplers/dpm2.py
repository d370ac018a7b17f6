"""DPM2 and DPM2 ancestral: k-diffusion's `sample_dpm_2` / `sample_dpm_2_ancestral`.

DPM-Solver-2 (Lu et al. 2022, "DPM-Solver", Alg. 1 with r = 1/2) written as Karras et al. 2022 use it:
an Euler half-step to the midpoint σ_mid = √(σ σ_next) (halfway in log σ), the slope there, and the
full step with that slope (a midpoint method, two UNet calls per step). The last step, to σ = 0, is an
Euler step. The ancestral variant aims at σ_down and then adds noise of std σ_up, as Euler ancestral.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .denoiser import SigmaDenoise
from .noise import Generators
from .sigmas import add_ancestral_noise, churn, get_ancestral_step, log_midpoint, to_d
from .step import Step, sigma_loop


def dpm2_update(denoise: SigmaDenoise, x: torch.Tensor, sigma: float, sigma_to: float,
                x0: torch.Tensor) -> torch.Tensor:
    """x moved from σ to σ_to by the midpoint rule in log σ, given x̂0 = D(x; σ); Euler when σ_to = 0."""
    d = to_d(x, sigma, x0)
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = log_midpoint(sigma, sigma_to)
    x_mid = x + d * (sigma_mid - sigma)
    _, x0_mid = denoise(x_mid, sigma_mid)
    return x + to_d(x_mid, sigma_mid, x0_mid) * (sigma_to - sigma)


def dpm2_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
               s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
               s_noise: float = 1.0) -> Iterator[Step]:
    """2 UNet calls per step, 1 for the last one; optional churn as `euler_steps`."""
    n = len(sigmas) - 1

    def update(i, x, sigma, sigma_next):
        x, sigma_hat = churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, generator)
        eps, x0 = denoise(x, sigma_hat)
        return eps, x0, dpm2_update(denoise, x, sigma_hat, sigma_next, x0)

    return sigma_loop(x, sigmas, update)


def dpm2_ancestral_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                         generator: Generators = None, eta: float = 1.0,
                         s_noise: float = 1.0) -> Iterator[Step]:
    """DPM-Solver-2 to σ_down, then + σ_up z; 2 UNet calls per step, 1 for the last one."""

    def update(i, x, sigma, sigma_next):
        eps, x0 = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x_next = dpm2_update(denoise, x, sigma, sigma_down, x0)
        return eps, x0, add_ancestral_noise(x_next, sigma_up, generator, s_noise)

    return sigma_loop(x, sigmas, update)
