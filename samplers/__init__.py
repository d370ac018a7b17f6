"""Samplers: generators of `Step`s over a denoiser. torch only: a sampler never sees a model.

Two spaces (Karras et al. 2022 show they are the same ODE/SDE, scaled), one sampler signature:
    fn(denoise, x, schedule, *, generator=None, **options) -> Iterator[Step]
with x already at the start of `schedule`, which the sampler walks to its end:
    alpha space   x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε at training timesteps t; `denoise(x, t) -> (eps, pred_x0)`
                  (`make_denoiser`); `schedule` is a `DDIMSchedule` (`ddim_schedule(alphas_cumprod, S)`,
                  or its first t_start steps for img2img): DDIM (`eta=`), PLMS, DDPM.
    sigma space   x_σ = x0 + σ ε = x_t / √ᾱ_t at σ = √((1-ᾱ)/ᾱ); `denoise(x, sigma) -> (eps, pred_x0)`
                  (`make_sigma_denoiser`, k-diffusion's CompVisDenoiser); `schedule` is the σ levels
                  (`get_sigmas(...)`: n + 1 ending in 0, or the last t_start + 1 of them): Euler, Euler a,
                  Heun, DPM2, DPM2 a, LMS, DPM++ 2M, DPM++ 2S a, DPM++ SDE.
`registry.resolve_sampler(name)` finds one by registry name or A1111 label; `spaces.denoiser_for` and
`spaces.start_for` build what its space wants around it; `drain(steps, x)` runs any of them to its end.

Notation (variable -> symbol):
    alphas_cumprod, alpha   ᾱ_t                      t, t_next      training timesteps (alpha space)
    sigma, sigma_next       σ_i, σ_{i+1}              sigmas         σ_0 > ... > σ_n = 0
    sigma_hat               σ̂ = σ (1 + γ) (churn)     sigma_down/up  σ_down, σ_up of an ancestral step
    eps                     ε̂                         pred_x0, x0    x̂0 = D(x; σ), the denoised estimate
    d                       dx/dσ = (x - x̂0)/σ        h, lam         λ = -log σ, h = λ_{i+1} - λ_i
    eta                     η: 0 deterministic, 1 ancestral (DDPM-like) noise
    s_churn, s_noise, s_tmin, s_tmax   S_churn, S_noise, S_tmin, S_tmax of Karras et al. 2022 Alg. 2
Papers: DDIM, Song et al. 2021 (eq. 12, 16); DDPM, Ho et al. 2020 (Alg. 2, eq. 6-7); PLMS, Liu et al. 2022
(PNDM, eq. 11-12); Euler/Heun/churn, Karras et al. 2022 (Alg. 1-2, eq. 5 for the "karras" schedule);
DPM2, Lu et al. 2022 (DPM-Solver, Alg. 1); DPM++, Lu et al. 2022 (DPM-Solver++, Alg. 1-2).
"""
from .ddim import ddim_steps, ddim_update
from .ddpm import ddpm_steps, ddpm_update
from .denoiser import (Denoise, Guided, SigmaDenoise, append_dims, apply_model, make_denoiser, make_guided,
                       make_sigma_denoiser, pred_x0_from_eps)
from .dpm2 import dpm2_ancestral_steps, dpm2_steps
from .dpmpp import dpmpp_2m_steps, dpmpp_2s_ancestral_steps, dpmpp_sde_steps
from .euler import euler_ancestral_steps, euler_steps
from .heun import heun_steps
from .lms import lms_coefficient, lms_steps
from .noise import BrownianNoise, Generators, noise_like, randn
from .plms import plms_steps
from .registry import REGISTRY, SamplerSpec, available, register, resolve_sampler
from .schedule import (SD_LINEAR, UPSCALER_LINEAR, DDIMSchedule, alphas_cumprod_from, check_t_start, ddim_schedule,
                       ddim_sigmas, ddim_start, ddim_timesteps, linear_alphas_cumprod, stochastic_encode)
from .sigmas import (euler_to_zero, get_ancestral_step, get_sigmas, model_sigmas, sigma_start, sigma_to_t,
                     t_to_sigma, to_d)
from .spaces import denoiser_for, start_for
from .step import Step, drain

__all__ = [
    "REGISTRY", "SamplerSpec", "available", "register", "resolve_sampler", "denoiser_for", "start_for",
    "Step", "drain",
    "Denoise", "SigmaDenoise", "Guided", "apply_model", "make_guided", "make_denoiser", "make_sigma_denoiser",
    "append_dims",
    "pred_x0_from_eps",
    "noise_like", "randn", "BrownianNoise", "Generators",
    "ddim_steps", "ddim_update", "plms_steps", "ddpm_steps", "ddpm_update",
    "euler_steps", "euler_ancestral_steps", "heun_steps", "dpm2_steps", "dpm2_ancestral_steps", "lms_steps",
    "lms_coefficient", "dpmpp_2m_steps", "dpmpp_2s_ancestral_steps", "dpmpp_sde_steps",
    "get_sigmas", "model_sigmas", "sigma_to_t", "t_to_sigma", "to_d", "get_ancestral_step", "euler_to_zero",
    "sigma_start",
    "DDIMSchedule", "ddim_schedule", "ddim_sigmas", "ddim_timesteps", "check_t_start", "ddim_start",
    "stochastic_encode", "linear_alphas_cumprod", "alphas_cumprod_from", "SD_LINEAR", "UPSCALER_LINEAR",
]
