"""Samplers: generators of `Step`s over a `denoise(x, t) -> (eps, pred_x0)` callable. torch only.

Every sampler in `SAMPLERS` has the signature
    steps(denoise, x, alphas_cumprod, num_steps, *, eta=0.0, generator=None, t_start=None) -> Iterator[Step]
and `drain(steps, x)` runs one to its end.
"""
from .ddim import ddim_sample, ddim_steps, ddim_update, noise_like, stochastic_encode
from .denoiser import Denoise, append_dims, make_denoiser, pred_x0_from_eps
from .plms import plms_sample, plms_steps
from .schedule import (SD_LINEAR, UPSCALER_LINEAR, DDIMSchedule, alphas_cumprod_from, ddim_schedule,
                       ddim_timesteps, linear_alphas_cumprod)
from .step import Step, drain

SAMPLERS = {"ddim": ddim_steps, "plms": plms_steps}

__all__ = [
    "SAMPLERS", "Step", "drain", "Denoise", "make_denoiser", "append_dims", "pred_x0_from_eps",
    "ddim_steps", "ddim_sample", "ddim_update", "noise_like", "stochastic_encode", "plms_steps", "plms_sample",
    "DDIMSchedule", "ddim_schedule", "ddim_timesteps", "linear_alphas_cumprod", "alphas_cumprod_from",
    "SD_LINEAR", "UPSCALER_LINEAR",
]
