"""Samplers by name: one frozen record per sampler, looked up by registry name or A1111 label.

    spec = resolve_sampler("DPM++ 2M Karras")     # or ("dpmpp_2m", schedule="karras"), "euler_a", "DDIM"
    spec.fn, spec.space, spec.schedule, spec.a1111_name   # dpmpp_2m_steps, "sigma", "karras", "DPM++ 2M Karras"

Every `fn` has the one signature `fn(denoise, x, schedule, *, generator=None, **options)`: `schedule`
is a `DDIMSchedule` in alpha space and the σ levels in sigma space (see `samplers.spaces` for the
denoiser and the start point each space wants). A new sampler is one file and one `register(...)`
line below. Names are matched case-insensitively after turning spaces and dashes into "_" and "++"
into "pp", so A1111's labels ("Euler a", "DPM++ 2M Karras", "DPM2 a", "LMS Karras", "DDIM") resolve
directly; a trailing "Karras"/"Exponential" picks that sigma schedule.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .ddim import ddim_steps
from .ddpm import ddpm_steps
from .dpm2 import dpm2_ancestral_steps, dpm2_steps
from .dpmpp import dpmpp_2m_steps, dpmpp_2s_ancestral_steps, dpmpp_sde_steps
from .euler import euler_ancestral_steps, euler_steps
from .heun import heun_steps
from .lms import lms_steps
from .plms import plms_steps
from .sigmas import SCHEDULE_ALIASES, SCHEDULES
from .step import Step

SPACES = ("alpha", "sigma")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and the sigma schedule it runs on (None in alpha space)."""
    name: str                    # canonical registry name, e.g. "dpmpp_2m"
    fn: Callable[..., Iterator[Step]]
    space: str                   # "alpha" (walks a DDIMSchedule) | "sigma" (walks σ levels)
    a1111: str                   # the label A1111 writes in its infotext, e.g. "DPM++ 2M"
    stochastic: bool = False     # draws fresh noise every step with its default options
    schedule: str | None = None  # "discrete" | "karras" | "exponential" in sigma space

    @property
    def a1111_name(self) -> str:
        """The A1111 label with its schedule, e.g. "DPM++ 2M Karras" (the discrete one adds nothing)."""
        return self.a1111 if self.schedule in (None, "discrete") else f"{self.a1111} {self.schedule.capitalize()}"

    def takes(self, option: str) -> bool:
        """Whether the sampler function has this keyword option (e.g. "eta", "s_churn", "order")."""
        return option in inspect.signature(self.fn).parameters

    def default(self, option: str):
        """The sampler function's own default for a keyword option (eta: 0 for DDIM, 1 for the ancestral ones)."""
        return inspect.signature(self.fn).parameters[option].default


REGISTRY: dict[str, SamplerSpec] = {}
ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower().replace("++", "pp"))


def register(name: str, fn: Callable[..., Iterator[Step]], space: str = "sigma", *, a1111: str | None = None,
             stochastic: bool = False, aliases: tuple[str, ...] = ()) -> SamplerSpec:
    """Add a sampler under `name` (and its A1111 label, default the name, and `aliases`); returns its record
    with the default schedule."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    key = _key(name)
    spec = SamplerSpec(key, fn, space, a1111 or name, stochastic, "discrete" if space == "sigma" else None)
    REGISTRY[key] = spec
    for alias in (name, spec.a1111, *aliases):
        ALIASES[_key(alias)] = key
    return spec


def resolve_sampler(name: str, schedule: str | None = None) -> SamplerSpec:
    """The record for a registry name or an A1111 label; `schedule` (or a trailing " Karras" /
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
    return dataclasses.replace(spec, schedule=schedule)


def available() -> list[str]:
    """Canonical names of every registered sampler."""
    return sorted(REGISTRY)


# name, function, space, A1111 label (as its infotext writes it), and older names people type
register("ddim", ddim_steps, "alpha", a1111="DDIM")
register("plms", plms_steps, "alpha", a1111="PLMS")
register("ddpm", ddpm_steps, "alpha", a1111="DDPM", stochastic=True)
register("euler", euler_steps, a1111="Euler", aliases=("k_euler",))
register("euler_a", euler_ancestral_steps, a1111="Euler a", stochastic=True, aliases=("euler_ancestral", "k_euler_a"))
register("heun", heun_steps, a1111="Heun", aliases=("k_heun",))
register("dpm2", dpm2_steps, a1111="DPM2", aliases=("dpm_2", "k_dpm_2"))
register("dpm2_a", dpm2_ancestral_steps, a1111="DPM2 a", stochastic=True,
         aliases=("dpm_2_ancestral", "dpm_2_a", "k_dpm_2_a"))
register("lms", lms_steps, a1111="LMS", aliases=("k_lms",))
register("dpmpp_2m", dpmpp_2m_steps, a1111="DPM++ 2M", aliases=("k_dpmpp_2m",))
register("dpmpp_2s_a", dpmpp_2s_ancestral_steps, a1111="DPM++ 2S a", stochastic=True,
         aliases=("dpmpp_2s_ancestral", "k_dpmpp_2s_a"))
register("dpmpp_sde", dpmpp_sde_steps, a1111="DPM++ SDE", stochastic=True, aliases=("k_dpmpp_sde",))
