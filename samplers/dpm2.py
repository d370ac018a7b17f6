"""DPM2 and DPM2 ancestral: k-diffusion's `sample_dpm_2` / `sample_dpm_2_ancestral`.

DPM-Solver-2 (Lu et al. 2022, "DPM-Solver", Alg. 1 with r = 1/2) written as Karras et al. 2022 use it:
an Euler half-step to the midpoint σ_mid = √(σ σ_next) (halfway in log σ), the slope there, and the
full step with that slope (a midpoint method, two UNet calls per step). The last step, to σ = 0, is an
Euler step (`euler_to_zero`). The ancestral variant aims at σ_down and then adds noise of std σ_up, as
Euler ancestral.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .denoiser import SigmaDenoise
from .noise import Generators
from .sigmas import add_ancestral_noise, as_floats, churn, euler_to_zero, get_ancestral_step, log_midpoint, to_d
from .step import Step


def dpm2_update(denoise: SigmaDenoise, x: torch.Tensor, sigma: float, sigma_to: float,
                x0: torch.Tensor) -> torch.Tensor:
    """x moved from σ to σ_to > 0 by the midpoint rule in log σ, given x̂0 = D(x; σ): one more UNet call."""
    d = to_d(x, sigma, x0)
    sigma_mid = log_midpoint(sigma, sigma_to)
    x_mid = x + d * (sigma_mid - sigma)
    _, x0_mid = denoise(x_mid, sigma_mid)
    return x + to_d(x_mid, sigma_mid, x0_mid) * (sigma_to - sigma)


def dpm2_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
               s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
               s_noise: float = 1.0) -> Iterator[Step]:
    """2 UNet calls per step, 1 for the last one; optional churn as `euler_steps`."""
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
            x_next = dpm2_update(denoise, x_hat, sigma_hat, sigma_next, x0)
        step = Step(index=i, total=n, sigma=sigma, sigma_next=sigma_next, x=x, eps=eps, pred_x0=x0, x_next=x_next)
        yield step
        x = step.x_next


def dpm2_ancestral_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                         generator: Generators = None, eta: float = 1.0,
                         s_noise: float = 1.0) -> Iterator[Step]:
    """DPM-Solver-2 to σ_down, then + σ_up z; 2 UNet calls per step, 1 for the last one."""
    sig = as_floats(sigmas)
    n = len(sig) - 1
    x = x.to(torch.float32)
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        eps, x0 = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x_next = euler_to_zero(x, sigma, x0)
        else:
            x_next = dpm2_update(denoise, x, sigma, sigma_down, x0)
        x_next = add_ancestral_noise(x_next, sigma_up, generator, s_noise)
        step = Step(index=i, total=n, sigma=sigma, sigma_next=sigma_next, x=x, eps=eps, pred_x0=x0, x_next=x_next)
        yield step
        x = step.x_next
