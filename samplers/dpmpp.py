"""DPM-Solver++ samplers: Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", as k-diffusion's `sample_dpmpp_2m`, `sample_dpmpp_2s_ancestral`, `sample_dpmpp_sde`.

They solve the diffusion ODE in λ = -log σ with the data prediction x̂0 = D(x; σ) held polynomial
(`dpm_solver_1` is the first-order step, (σ_to/σ) x - (e^{-h} - 1) x̂0 with h = λ_to - λ, i.e. DDIM).
    DPM++ 2M    Alg. 2 (multistep, second order): x̂0 is extrapolated from this step's and the previous
                step's, D = (1 + 1/(2r)) x̂0_i - 1/(2r) x̂0_{i-1}, r = h_{i-1}/h_i; the first step and the
                last (to σ = 0) are first order. One UNet call per step.
    DPM++ 2S a  Alg. 1 (singlestep, second order, r = 1/2): a first-order step to the log-midpoint
                σ_s = √(σ σ_down), x̂0 there, and the step from σ to σ_down with it; then + σ_up z
                (ancestral, `get_ancestral_step`; η = 0 makes it the deterministic DPM++ 2S). Two calls.
    DPM++ SDE   the same singlestep pair, each half made stochastic as an ancestral step
                (σ_down/σ_up of both sub-steps) with noise from one Brownian path, and x̂0 mixed as
                Alg. 1 for a general r: (1 - 1/(2r)) x̂0 + 1/(2r) x̂0_s. Two calls per step.
2S a and SDE end with an Euler step to σ = 0 (`euler_to_zero`, x̂0 of the last call up to rounding); 2M's
first-order step lands on that x̂0 exactly, as in k-diffusion.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .denoiser import SigmaDenoise
from .noise import BrownianNoise, Generators
from .sigmas import add_ancestral_noise, as_floats, dpm_solver_1, euler_to_zero, get_ancestral_step, lam
from .step import Step

NoiseSampler = Callable[[float, float], torch.Tensor]


def dpmpp_2m_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                   generator: Generators = None) -> Iterator[Step]:
    """One UNet call per step; `generator` is unused (deterministic) and kept for the shared signature."""
    sig = as_floats(sigmas)
    n = len(sig) - 1
    x = x.to(torch.float32)
    sigma_prev, x0_prev = None, None   # σ and x̂0 of the previous step
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        eps, x0 = denoise(x, sigma)
        if x0_prev is None or sigma_next == 0:   # first order: the first step, and the last one (lands on x̂0)
            x_next = dpm_solver_1(x, sigma, sigma_next, x0)
        else:
            r = (lam(sigma) - lam(sigma_prev)) / (lam(sigma_next) - lam(sigma))
            x_next = dpm_solver_1(x, sigma, sigma_next, (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev)
        step = Step(index=i, total=n, sigma=sigma, sigma_next=sigma_next, x=x, eps=eps, pred_x0=x0, x_next=x_next)
        yield step
        x, sigma_prev, x0_prev = step.x_next, sigma, x0


def dpmpp_2s_ancestral_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                             generator: Generators = None, eta: float = 1.0,
                             s_noise: float = 1.0) -> Iterator[Step]:
    """Two UNet calls per step (one for the last), one noise draw per step but the last."""
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
            sigma_s = (sigma * sigma_down) ** 0.5      # λ_s = λ + h/2
            _, x0_s = denoise(dpm_solver_1(x, sigma, sigma_s, x0), sigma_s)
            x_next = dpm_solver_1(x, sigma, sigma_down, x0_s)
        x_next = add_ancestral_noise(x_next, sigma_up, generator, s_noise)
        step = Step(index=i, total=n, sigma=sigma, sigma_next=sigma_next, x=x, eps=eps, pred_x0=x0, x_next=x_next)
        yield step
        x = step.x_next


def dpmpp_sde_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                    generator: Generators = None, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
                    noise_sampler: NoiseSampler | None = None) -> Iterator[Step]:
    """Two UNet calls per step (one for the last), two noise increments per step but the last.

    noise_sampler(σ, σ_next) -> unit-variance noise for that interval; by default `BrownianNoise` on
    `generator`, which has the law of k-diffusion's torchsde `BrownianTreeNoiseSampler` but not its
    numbers (see `noise.BrownianNoise`). With η = 0 no noise is drawn and r = 1/2 gives DPM++ 2S.
    """
    noise = noise_sampler if noise_sampler is not None else BrownianNoise(x, generator)
    fac = 1 / (2 * r)
    sig = as_floats(sigmas)
    n = len(sig) - 1
    x = x.to(torch.float32)
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        eps, x0 = denoise(x, sigma)
        if sigma_next == 0:
            x_next = euler_to_zero(x, sigma, x0)
        else:
            sigma_s = sigma ** (1 - r) * sigma_next ** r   # λ_s = λ + r h
            down, up = get_ancestral_step(sigma, sigma_s, eta)
            x_s = dpm_solver_1(x, sigma, down, x0)
            if up > 0:
                x_s = x_s + noise(sigma, sigma_s) * (s_noise * up)
            _, x0_s = denoise(x_s, sigma_s)
            down, up = get_ancestral_step(sigma, sigma_next, eta)
            x_next = dpm_solver_1(x, sigma, down, (1 - fac) * x0 + fac * x0_s)
            if up > 0:
                x_next = x_next + noise(sigma, sigma_next) * (s_noise * up)
        step = Step(index=i, total=n, sigma=sigma, sigma_next=sigma_next, x=x, eps=eps, pred_x0=x0, x_next=x_next)
        yield step
        x = step.x_next
