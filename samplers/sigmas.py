"""Sigma space: the model's noise levels, the schedules sigma-space samplers walk, and their step helpers.

Notation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):
    sigma            -> σ, the noise level of x_σ = x0 + σ ε (the variance-exploding view of the model)
    model_sigmas     -> σ_t = √((1 - ᾱ_t) / ᾱ_t), t = 0 .. T-1: one per training timestep, ascending
    sigmas           -> σ_0 > σ_1 > ... > σ_{n-1} > σ_n = 0: the n + 1 levels an n-step run walks
    t(σ)             -> the (fractional) timestep of σ: log σ interpolated linearly between the two
                        training timesteps around it, as k-diffusion's `DiscreteSchedule.sigma_to_t`
    sigma_down/up    -> σ_down, σ_up of an ancestral step: deterministic to σ_down, then noise of
                        std σ_up, with σ_down² + σ_up² = σ_next²

x_σ and the latent of the alpha space x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε are the same point scaled:
x_t = x_σ / √(σ² + 1) at σ = σ_t. img2img runs the last t_start steps, from x0 + σ ε at the first
of the last t_start + 1 levels (`sigma_start`, A1111's img2img).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .noise import Generators, noise_like
from .schedule import check_t_start

SCHEDULES = ("discrete", "karras", "exponential")
SCHEDULE_ALIASES = {"normal": "discrete", "default": "discrete", "automatic": "discrete"}
KARRAS_RHO = 7.0


def model_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 - ᾱ_t)/ᾱ_t) for every training timestep, float32 [T], ascending (CPU)."""
    ac = alphas_cumprod.detach().to("cpu", torch.float32)
    return ((1 - ac) / ac) ** 0.5


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """The fractional timestep of each σ: log σ interpolated between its two neighbouring log σ_t.

    Clamped to [0, T-1] outside the model's range (σ = 0 gives t = 0). quantize: the nearest
    training timestep instead (k-diffusion's `quantize=True`, A1111's default "quantization in K
    samplers"): within one interval log σ is linear in t, so this is round(t).
    """
    log_sigma = sigma.to(log_sigmas.dtype).log()
    dists = log_sigma - log_sigmas[:, None]
    if quantize:
        return dists.abs().argmin(dim=0).view(sigma.shape).to(torch.float32)
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).view(sigma.shape).to(torch.float32)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """σ at a (fractional) timestep: log σ_t interpolated linearly in t."""
    t = t.to(torch.float32)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def get_sigmas(alphas_cumprod: torch.Tensor, n: int, schedule: str = "discrete", *,
               rho: float = KARRAS_RHO) -> torch.Tensor:
    """n + 1 noise levels, float32, from the model's σ_max down to its σ_min, then 0.

    "discrete" ("normal"): k-diffusion `DiscreteSchedule.get_sigmas(n)`, t = linspace(T-1, 0, n) mapped to
        σ by interpolating log σ_t (equals diffusers' `timestep_spacing="linspace"` whenever those t are
        whole numbers, e.g. n = 10, where linear and log interpolation agree);
    "karras": Karras et al. 2022 eq. 5, σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, ρ = 7;
    "exponential": σ evenly spaced in log σ between σ_max and σ_min.
    """
    schedule = SCHEDULE_ALIASES.get(schedule.lower(), schedule.lower())
    if n < 1:
        raise ValueError(f"need at least one step, got {n}")
    ms = model_sigmas(alphas_cumprod)
    sigma_min, sigma_max = ms[0].item(), ms[-1].item()
    if schedule == "discrete":
        t = torch.linspace(len(ms) - 1, 0, n)
        sigmas = t_to_sigma(t, ms.log())
    elif schedule == "karras":
        ramp = torch.linspace(0, 1, n)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
    elif schedule == "exponential":
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
    else:
        raise ValueError(f"unknown sigma schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    return torch.cat([sigmas.to(torch.float32), sigmas.new_zeros(1)])


def sigma_start(noise: torch.Tensor, sigmas: torch.Tensor, x0: torch.Tensor | None = None,
                t_start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, the levels to walk) of a sigma-space run from unit `noise`: txt2img starts at σ_0 z; img2img
    (x0 given) walks the last `t_start` steps, the last t_start + 1 levels, from x0 + σ z at the first."""
    n = len(sigmas) - 1
    sigmas = sigmas[n - check_t_start(t_start, n):]
    x = noise * sigmas[0].item()
    return (x if x0 is None else x0.to(torch.float32) + x), sigmas


def as_floats(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    """The σ as Python floats, exactly as given: the samplers' scalar step math runs on them."""
    return sigmas.tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]


# ---------------------------------------------------------------- step helpers shared by the samplers
def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE, (x - D(x; σ)) / σ (Karras et al. 2022, eq. 3 with σ(t) = t)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step from σ to σ_next, k-diffusion's `get_ancestral_step`.

    σ_up = min(σ_next, η √(σ_next² (σ² - σ_next²) / σ²)), σ_down = √(σ_next² - σ_up²): at η = 1 this is
    the DDPM posterior variance of the step written in σ (Ho et al. 2020, eq. 7); at η = 0 no noise.
    """
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def log_midpoint(a: float, b: float) -> float:
    """√(a b): halfway between two noise levels in log σ (DPM-Solver-2's intermediate point)."""
    return math.exp(0.5 * (math.log(a) + math.log(b)))


def lam(sigma: float) -> float:
    """λ = -log σ, the log signal-to-noise ratio (half of it) DPM-Solver steps are uniform in (Lu et al. 2022)."""
    return -math.log(sigma)


def dpm_solver_1(x: torch.Tensor, sigma: float, sigma_to: float, denoised: torch.Tensor) -> torch.Tensor:
    """First-order DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", sec. 4, h = λ_to - λ): x moved from σ to σ_to
    holding x̂0 fixed, (σ_to/σ) x - (e^{-h} - 1) x̂0. It equals DDIM (η = 0) and the Euler step in σ. At
    σ_to = 0 (h = ∞: DPM++ 2M's last step, or an ancestral step with η > 1 aiming at σ_down = 0) the formula's
    limit is x̂0 itself, which is returned exactly, as k-diffusion's form gives it (0 · x + 1 · x̂0)."""
    if sigma_to == 0:
        return denoised
    return (sigma_to / sigma) * x - math.expm1(lam(sigma) - lam(sigma_to)) * denoised


def euler_to_zero(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The last step, σ -> 0, of every sampler whose own step is undefined there (a slope at σ = 0, log 0
    in λ): one Euler step x + (0 - σ) (x - x̂0) / σ, i.e. x̂0 up to rounding (Karras et al. 2022, Alg. 2
    line 8 without the correction of lines 9-11, as k-diffusion)."""
    return x + to_d(x, sigma, denoised) * (0.0 - sigma)


def churn(x: torch.Tensor, sigma: float, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float, generator: Generators) -> tuple[torch.Tensor, float]:
    """(x̂, σ̂) of Karras et al. 2022, Alg. 2 lines 4-7: raise the noise level from σ to σ̂ = σ (1 + γ) with
    γ = min(S_churn / N, √2 - 1) inside [S_tmin, S_tmax], adding noise of std S_noise √(σ̂² - σ²).
    With S_churn = 0 (the default everywhere) it is the identity and draws nothing."""
    gamma = min(s_churn / num_steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + noise_like(x, generator) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5, sigma_hat


def add_ancestral_noise(x: torch.Tensor, sigma_up: float, generator: Generators, s_noise: float = 1.0) -> torch.Tensor:
    """x + S_noise σ_up z, z ~ N(0, I) from `generator`; no draw when σ_up = 0 (η = 0, or the last step)."""
    if sigma_up <= 0:
        return x
    return x + noise_like(x, generator) * (s_noise * sigma_up)
