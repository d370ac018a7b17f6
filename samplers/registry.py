"""Samplers by name, and one call shape for both spaces.

    spec = resolve_sampler("DPM++ 2M Karras")          # or ("dpmpp_2m", schedule="karras"), "euler_a", "DDIM"
    denoise = spec.make_denoiser(unet, cond, uncond, scale, parameterization, alphas_cumprod, dtype=dtype)
    steps = spec.steps(denoise, noise, alphas_cumprod, num_steps, generator=generator)        # txt2img
    steps = spec.steps(denoise, noise, alphas_cumprod, num_steps, x0=latent, t_start=t_enc,  # img2img
                       generator=generator)

`noise` is unit-variance (e.g. `noise.randn(shape, generator)`); `SamplerSpec.steps` puts it where the
space wants it: alpha space starts from x_T = noise (img2img: `stochastic_encode(x0, ..., noise)`, as
the original), sigma space from σ_0 noise (img2img: x0 + σ_0 noise, A1111's img2img), where σ_0 is the
first of the `t_start + 1` last levels. The sampler functions themselves take x as they will use it.

A new sampler is one file and one `register(...)` line below. Names are matched case-insensitively
after turning spaces and dashes into "_" and "++" into "pp", so A1111's labels ("Euler a",
"DPM++ 2M Karras", "DPM2 a", "LMS Karras", "DPM++ SDE Karras", "DDIM", "PLMS") resolve directly; a
trailing "Karras"/"Exponential" picks that sigma schedule.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .ddim import ddim_steps, stochastic_encode
from .ddpm import ddpm_steps
from .denoiser import make_denoiser, make_sigma_denoiser
from .dpm2 import dpm2_ancestral_steps, dpm2_steps
from .dpmpp import dpmpp_2m_steps, dpmpp_2s_ancestral_steps, dpmpp_sde_steps
from .euler import euler_ancestral_steps, euler_steps
from .heun import heun_steps
from .lms import lms_steps
from .noise import Generators
from .plms import plms_steps
from .schedule import ddim_timesteps
from .sigmas import SCHEDULE_ALIASES, SCHEDULES, get_sigmas
from .step import Step

SPACES = ("alpha", "sigma")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and the sigma schedule it runs on (None in alpha space)."""
    name: str                    # canonical registry name, e.g. "dpmpp_2m"
    fn: Callable[..., Iterator[Step]]
    space: str                   # "alpha": fn(denoise(x, t), x, alphas_cumprod, num_steps, ...)
                                 # "sigma": fn(denoise(x, sigma), x, sigmas, ...)
    schedule: str | None = None  # "discrete" | "karras" | "exponential" for sigma space
    stochastic: bool = False     # draws fresh noise every step with its default options

    @property
    def label(self) -> str:
        return self.name if self.schedule in (None, "discrete") else f"{self.name} ({self.schedule})"

    def takes(self, option: str) -> bool:
        """Whether the sampler function has this keyword option (e.g. "eta", "s_churn", "order")."""
        return option in inspect.signature(self.fn).parameters

    def sigmas(self, alphas_cumprod: torch.Tensor, num_steps: int) -> torch.Tensor:
        """The n + 1 noise levels of a full run (sigma space only)."""
        if self.space != "sigma":
            raise ValueError(f"{self.name} runs on timesteps, not noise levels")
        return get_sigmas(alphas_cumprod, num_steps, self.schedule or "discrete")

    def num_steps(self, num_steps: int) -> int:
        """How many steps a full run of `num_steps` yields (the original's DDIM spacing may add one)."""
        return len(ddim_timesteps(num_steps)) if self.space == "alpha" else num_steps

    def make_denoiser(self, model: Callable, cond: Any, uncond: Any, scale: float, parameterization: str,
                      alphas_cumprod: torch.Tensor, *, dtype: torch.dtype | None = None,
                      quantize: bool = False) -> Callable:
        """The denoiser this sampler calls: `make_denoiser` (t) or `make_sigma_denoiser` (σ)."""
        if self.space == "sigma":
            return make_sigma_denoiser(model, cond, uncond, scale, parameterization, alphas_cumprod,
                                       dtype=dtype, quantize=quantize)
        return make_denoiser(model, cond, uncond, scale, parameterization, alphas_cumprod, dtype=dtype)

    def steps(self, denoise: Callable, noise: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int, *,
              x0: torch.Tensor | None = None, t_start: int | None = None, generator: Generators = None,
              **options) -> Iterator[Step]:
        """The run's steps from unit noise (txt2img) or from `x0` noised to step `t_start` (img2img: the
        last `t_start` of `num_steps` steps). `options` go to the sampler (eta, s_churn, order...)."""
        if x0 is not None and t_start is None:
            raise ValueError("img2img needs t_start, the number of steps to run")
        noise = noise.to(device=x0.device if x0 is not None else noise.device, dtype=torch.float32)
        if self.space == "alpha":
            x = noise
            if x0 is not None:
                n = self.num_steps(num_steps)
                x = stochastic_encode(x0, alphas_cumprod, num_steps, min(t_start, n - 1), noise=noise)
            return self.fn(denoise, x, alphas_cumprod, num_steps, generator=generator, t_start=t_start, **options)
        sigmas = self.sigmas(alphas_cumprod, num_steps)
        if t_start is not None:
            if not 0 <= t_start <= num_steps:
                raise ValueError(f"t_start must be in 0..{num_steps}, got {t_start}")
            sigmas = sigmas[num_steps - t_start:]
        x = noise * sigmas[0].item()
        if x0 is not None:
            x = x0.to(torch.float32) + x
        return self.fn(denoise, x, sigmas, generator=generator, **options)


REGISTRY: dict[str, SamplerSpec] = {}
ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower().replace("++", "pp"))


def register(name: str, fn: Callable[..., Iterator[Step]], space: str = "sigma", *, stochastic: bool = False,
             aliases: tuple[str, ...] = ()) -> SamplerSpec:
    """Add a sampler under `name` (and `aliases`); returns its spec with the default schedule."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    key = _key(name)
    spec = SamplerSpec(key, fn, space, "discrete" if space == "sigma" else None, stochastic)
    REGISTRY[key] = spec
    for alias in (name, *aliases):
        ALIASES[_key(alias)] = key
    return spec


def resolve_sampler(name: str, schedule: str | None = None) -> SamplerSpec:
    """The spec for a registry name or an A1111 label; `schedule` (or a trailing " Karras" /
    " Exponential" in the name) picks the sigma schedule of a sigma-space sampler."""
    key = _key(name)
    named = None
    for suffix in ("karras", "exponential"):
        if key.endswith("_" + suffix) and key not in ALIASES:
            key, named = key[: -len(suffix) - 1], suffix
    if key not in ALIASES:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(sorted(REGISTRY))}")
    spec = REGISTRY[ALIASES[key]]
    if schedule is not None:
        schedule = SCHEDULE_ALIASES.get(schedule.lower(), schedule.lower())
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown sigma schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
        if named is not None and schedule != named:
            raise ValueError(f"{name!r} names the {named} schedule, but schedule={schedule!r} was given")
    schedule = schedule or named
    if schedule is None:
        return spec
    if spec.space != "sigma":
        if schedule == "discrete":
            return spec
        raise ValueError(f"{spec.name} runs on timesteps: it takes no sigma schedule ({schedule!r})")
    return SamplerSpec(spec.name, spec.fn, spec.space, schedule, spec.stochastic)


def available() -> list[str]:
    """Canonical names of every registered sampler."""
    return sorted(REGISTRY)


# name, function, space; the A1111 label is the first alias where it does not follow from the name
register("ddim", ddim_steps, "alpha")
register("plms", plms_steps, "alpha")
register("ddpm", ddpm_steps, "alpha", stochastic=True)
register("euler", euler_steps, aliases=("k_euler",))
register("euler_a", euler_ancestral_steps, stochastic=True, aliases=("euler_ancestral", "k_euler_a"))
register("heun", heun_steps, aliases=("k_heun",))
register("dpm2", dpm2_steps, aliases=("dpm_2", "k_dpm_2"))
register("dpm2_a", dpm2_ancestral_steps, stochastic=True, aliases=("dpm_2_ancestral", "dpm_2_a", "k_dpm_2_a"))
register("lms", lms_steps, aliases=("k_lms",))
register("dpmpp_2m", dpmpp_2m_steps, aliases=("k_dpmpp_2m",))
register("dpmpp_2s_a", dpmpp_2s_ancestral_steps, stochastic=True,
         aliases=("dpmpp_2s_ancestral", "k_dpmpp_2s_a"))
register("dpmpp_sde", dpmpp_sde_steps, stochastic=True, aliases=("k_dpmpp_sde",))
