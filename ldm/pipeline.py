"""txt2img and img2img as plain functions over a loaded model (inpaint, depth2img and upscale, for the
special checkpoints, are in ldm/inpainting.py, ldm/depth.py and ldm/upscaling.py, and reachable from here too).

Each pipeline comes in two forms: `*_steps(...)` yields the sampler's `Step`s (look at `x`, `eps`,
`pred_x0` at any step, `break`, or replace `step.x_next`), and `txt2img(...)`/`img2img(...)` run
them to the end and decode. `sampler` is any name of `samplers.registry` ("ddim", "plms", "euler_a",
"DPM++ 2M Karras", ...); `schedule` picks the sigma schedule of the k-diffusion ones.

Randomness comes from CPU `torch.Generator`s, so a seed gives the same image on every device, drawn in
the original scripts' order:
    txt2img: per iteration, x_T (unless a fixed x_T is given), then the sampler's per-step noise;
    img2img: once, the posterior sample of the init image; per iteration, the stochastic-encode
             noise, then the sampler's per-step noise.
`seed_mode="original"` draws the whole batch from one generator (on the CPU: the original's noise);
`"per-sample"` gives image i its own generator seeded `seed + i` for all of its draws, so image i is
the same whether it is made alone or in a batch.

`prompt_syntax="original"` (the default) encodes prompts as the original scripts (77 tokens, brackets are
text); `"a1111"` as AUTOMATIC1111 (ldm/prompts.py: weights, long prompts in chunks, BREAK; prompt editing
and alternation switch the conditioning at the steps ldm/prompt_schedule.py says).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Optional, Union

import torch

from samplers import Step, drain
from samplers.noise import Generators, noise_like, randn
from samplers.registry import SamplerSpec, resolve_sampler
from samplers.spaces import denoiser_for, start_for

from .loading import LatentDiffusion
from .prompts import Conditioning, check_syntax, pad_to

Prompts = Union[str, list[str]]
_HALVES = (torch.float16, torch.bfloat16)


class NonFiniteError(ValueError):
    """NaN or Inf where an image is being made; the message says where it first appeared and what to try."""


def check_finite(t: torch.Tensor, where: str, hint: str) -> torch.Tensor:
    """`t` itself, or NonFiniteError naming `where`: a NaN spreads through every later step and ends as a
    black PNG, so it is caught where it appears."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{where} holds NaN or Inf values; {hint}")
    return t


def _batch(prompt: Prompts, n: int) -> list[str]:
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for a batch of {n}")
    return prompts


@torch.no_grad()
def encode_text(model: LatentDiffusion, prompts: list[str]) -> torch.Tensor:
    tokens = model.tokenizer(prompts).to(model.placement.device)
    return check_finite(model.text_encoder(tokens), "the text encoder's output",
                        "the checkpoint's text-encoder weights are damaged (python -m ldm inspect shows the file)")


@torch.no_grad()
def decode(model: LatentDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1], float32.

    A VAE in float16/bfloat16 whose activations overflow (SD 2.x's can) decodes NaN: it is switched to
    float32 for the rest of the run, with a warning, and the latents decoded again."""
    check_finite(latents, "the sampled latents", "the UNet's weights are damaged, or the settings diverge")
    dtype = model.vae.post_quant_conv.weight.dtype
    image = model.vae.decode((latents / model.scale_factor).to(model.placement.device, dtype)).float()
    if dtype in _HALVES and not bool(torch.isfinite(image).all()):
        note = f"the VAE overflowed in {str(dtype).replace('torch.', '')}; decoding in float32 from now on"
        warnings.warn(note, stacklevel=2)
        model.notes.append(note)
        model.vae.float()
        return decode(model, latents)
    return check_finite(image, "the VAE's decoded image", "the checkpoint's VAE weights are damaged")


SEED_MODES = ("original", "per-sample")


def make_generators(seed: int, n: int, seed_mode: str = "original") -> Generators:
    """One CPU generator for the batch ("original"), or n of them seeded seed, seed+1, ... ("per-sample")."""
    if seed_mode == "original":
        return torch.Generator().manual_seed(seed)
    if seed_mode == "per-sample":
        return [torch.Generator().manual_seed(seed + i) for i in range(n)]
    raise ValueError(f"seed mode must be one of {', '.join(SEED_MODES)}, got {seed_mode!r}")


class NumpyStartCodes:
    """The start code of the inpainting and upscaling scripts: `np.random.RandomState(seed).randn(n, C, h, w)`
    in float64, cast to float32, independent of torch's generator. Successive `draw`s continue the stream
    (batch k of a run is the k-th draw; the first is the scripts'); "per-sample" gives image i its own
    RandomState(seed + i). numpy takes seeds in 0..2**32 - 1."""

    def __init__(self, seed: int, n: int, seed_mode: str = "original"):
        import numpy as np

        seeds = [seed] if seed_mode == "original" else [seed + i for i in range(n)]
        if seed_mode not in SEED_MODES:
            raise ValueError(f"seed mode must be one of {', '.join(SEED_MODES)}, got {seed_mode!r}")
        if not all(0 <= s < 2 ** 32 for s in seeds):
            raise ValueError(f"seed {seed}: numpy's RandomState takes seeds in 0..{2 ** 32 - 1}"
                             + (f" (per-sample mode uses seed .. seed + {n - 1})" if n > 1 and len(seeds) > 1 else ""))
        self.states = [np.random.RandomState(s) for s in seeds]

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        if len(self.states) == 1:
            return torch.from_numpy(self.states[0].randn(*shape)).to(torch.float32)
        if shape[0] > len(self.states):
            raise ValueError(f"{len(self.states)} per-sample seeds for a batch of {shape[0]}")
        return torch.cat([torch.from_numpy(s.randn(1, *shape[1:])) for s in self.states[:shape[0]]]).to(torch.float32)


@torch.no_grad()
def encode_image(model: LatentDiffusion, images: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents, sampling the posterior as the original (one noise draw)."""
    posterior = model.vae.encode(images.to(model.placement.device, model.placement.dtype))
    # randn takes one generator or one per sample (per-sample seed mode)
    return (model.scale_factor * posterior.sample(noise=randn(posterior.mean.shape, generator))).float()


def latent_shape(model: LatentDiffusion, n: int, height: int, width: int) -> tuple[int, int, int, int]:
    f = model.config.vae.downsampling_factor
    return (n, model.config.vae.embed_dim, height // f, width // f)


PIPELINE_OF = {"sd1_inpaint": "inpaint", "sd2_inpaint": "inpaint", "sd2_depth": "depth2img",
               "x4_upscaler": "upscale"}


def _denoiser(model: LatentDiffusion, spec: SamplerSpec, prompts: list[str], negative: list[str], scale: float,
              c_concat: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, *,
              prompt_syntax: str = "original", steps: int = 0):
    """The guided denoiser over the prompts' text conditioning, plus for the hybrid models the channels
    concatenated to the latent (`c_concat`) and the class label (`y`): both halves of the guided batch get
    the same ones, as in the original scripts. With the a1111 syntax, a `_Switching` denoiser over a run
    of `steps` steps (`_checked` moves it on)."""
    if model.parameterization is None:
        raise ValueError("the model's prediction type (eps or v) is not known; load it with prediction=\"eps\" or \"v\"")
    extra = 0 if c_concat is None else c_concat.shape[1]
    if model.config.vae.embed_dim + extra != model.config.unet.in_channels:
        needs = PIPELINE_OF.get(model.family)
        raise ValueError(f"this {model.family} model's UNet takes {model.config.unet.in_channels} input channels, "
                         f"not {model.config.vae.embed_dim} + {extra}"
                         + (f"; use ldm.pipeline.{needs}" if needs and c_concat is None else ""))
    hybrid = {k: v for k, v in (("c_concat", c_concat), ("y", y)) if v is not None}

    def make(cond: torch.Tensor, uncond: Optional[torch.Tensor]):
        if hybrid:
            cond = {"c_crossattn": cond, **hybrid}
            uncond = None if uncond is None else {"c_crossattn": uncond, **hybrid}
        return denoiser_for(spec, model.unet, cond, uncond, scale, model.parameterization, model.alphas_cumprod,
                            dtype=model.placement.dtype)

    if check_syntax(prompt_syntax) == "a1111":
        return _Switching(model, make, prompts, negative if scale != 1.0 else None, steps)
    # The original encodes the empty string for the unconditional half, never zeros.
    return make(encode_text(model, prompts), encode_text(model, negative) if scale != 1.0 else None)


class _Switching:
    """The a1111 denoiser: the guided denoiser of the texts in force at the current step (prompt editing,
    alternation), one built per distinct pair of cond/uncond texts. The shorter of cond and uncond is
    padded with the empty prompt's chunk, as A1111's "pad prompt/negative prompt to be same length"."""

    def __init__(self, model: LatentDiffusion, make, prompts: list[str], negative: Optional[list[str]], steps: int):
        self.make, self.built = make, {}
        self.cond = Conditioning(model, prompts, steps)
        self.uncond = None if negative is None else Conditioning(model, negative, steps)
        self.empty = None if negative is None else Conditioning(model, [""], steps).at(0)
        self.at(0)

    def at(self, step: int) -> None:
        """Condition from `step` (counted from 0) on."""
        key = (tuple(self.cond.texts_at(step)), None if self.uncond is None else tuple(self.uncond.texts_at(step)))
        if key not in self.built:
            cond, uncond = self.cond.at(step), None if self.uncond is None else self.uncond.at(step)
            for c in (cond, uncond, self.empty):
                if c is not None:
                    check_finite(c, "the text encoder's output", "the checkpoint's text-encoder weights are damaged "
                                 "(python -m ldm inspect shows the file)")
            if uncond is not None:
                length = max(cond.shape[1], uncond.shape[1])
                cond, uncond = pad_to(cond, length, self.empty), pad_to(uncond, length, self.empty)
            self.built[key] = self.make(cond, uncond)
        self.current = self.built[key]

    def __call__(self, x, t):
        return self.current(x, t)


def _options(spec: SamplerSpec, eta: Optional[float]) -> dict:
    """The sampler's keyword options; eta None keeps the sampler's own (0 for DDIM, 1 for the ancestral ones)."""
    if eta is None:
        return {}
    if spec.takes("eta"):
        return {"eta": eta}
    if eta:
        raise ValueError(f"the {spec.name} sampler takes no eta (got {eta}); leave it at 0")
    return {}


@torch.no_grad()
def txt2img_steps(model: LatentDiffusion, prompt: Prompts, *, negative_prompt: Prompts = "", n_samples: int = 1,
                  height: int = 512, width: int = 512, steps: int = 50, sampler: str = "plms",
                  schedule: Optional[str] = None, scale: float = 7.5, eta: Optional[float] = None,
                  generator: Generators = None, x_T: Optional[torch.Tensor] = None,
                  prompt_syntax: str = "original") -> Iterator[Step]:
    """The sampler's steps for one batch of `n_samples` images; the last `x_next` is the latent.
    x_T: unit-variance starting noise (drawn from `generator` when not given)."""
    spec = resolve_sampler(sampler, schedule)
    options = _options(spec, eta)
    denoise = _denoiser(model, spec, _batch(prompt, n_samples), _batch(negative_prompt, n_samples), scale,
                        prompt_syntax=prompt_syntax, steps=steps)
    if x_T is None:
        x_T = randn(latent_shape(model, n_samples, height, width), generator)
    x, schedule = start_for(spec, x_T.to(model.placement.device), model.alphas_cumprod, steps)
    yield from _checked(spec.fn(denoise, x, schedule, generator=generator, **options), denoise)


def _checked(steps: Iterator[Step], denoise=None) -> Iterator[Step]:
    """The sampler's steps, each one's prediction checked, so that the first NaN is named by its step, not
    found later as a black image. On the CPU before the step is handed on; on an accelerator reading a flag
    would stall its queue every step, so the flags stay there and are read once, when the run ends.
    A `_Switching` denoiser is moved on to the next step's texts once a step is handed on (the sampler
    computes the next step only when asked for it)."""
    hint = "the UNet's weights are damaged, or the settings diverge (a very large --scale?)"
    pending: list[tuple[str, torch.Tensor]] = []
    for step in steps:
        where = f"step {step.index + 1} of {step.total}'s prediction"
        if step.pred_x0.device.type == "cpu":
            check_finite(step.pred_x0, where, hint)
        else:
            pending.append((where, torch.isfinite(step.pred_x0).all()))
        yield step
        if isinstance(denoise, _Switching):
            denoise.at(step.index + 1)
    if pending and not bool(torch.stack([finite for _, finite in pending]).all()):
        raise NonFiniteError(f"{next(w for w, finite in pending if not finite)} holds NaN or Inf values; {hint}")


def strength_to_steps(strength: float, steps: int) -> int:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return int(strength * steps)


@torch.no_grad()
def img2img_steps(model: LatentDiffusion, init_latent: torch.Tensor, prompt: Prompts, *, strength: float = 0.8,
                  negative_prompt: Prompts = "", steps: int = 50, sampler: str = "ddim",
                  schedule: Optional[str] = None, scale: float = 7.5, eta: Optional[float] = None,
                  generator: Generators = None, prompt_syntax: str = "original") -> Iterator[Step]:
    """Noise `init_latent` (scaled, from `encode_image`) to `t_enc = int(strength * steps)` and denoise
    from there, as the original img2img: the last `t_enc` steps of the `steps`-step schedule.

    strength 1.0 (t_enc = steps) starts from the top of the schedule; the original crashes there
    (it indexes one past its DDIM table)."""
    spec = resolve_sampler(sampler, schedule)
    options = _options(spec, eta)
    t_enc = strength_to_steps(strength, steps)
    n = init_latent.shape[0]
    denoise = _denoiser(model, spec, _batch(prompt, n), _batch(negative_prompt, n), scale,
                        prompt_syntax=prompt_syntax, steps=steps)
    x0 = init_latent.to(model.placement.device)
    x, schedule = start_for(spec, noise_like(x0, generator), model.alphas_cumprod, steps, x0=x0, t_start=t_enc)
    yield from _checked(spec.fn(denoise, x, schedule, generator=generator, **options), denoise)


def txt2img(model: LatentDiffusion, prompt: Prompts, *, seed: int = 42, n_iter: int = 1,
            fixed_code: bool = False, n_samples: int = 1, height: int = 512, width: int = 512,
            seed_mode: str = "original", **kwargs) -> list[torch.Tensor]:
    """`n_iter` batches of `n_samples` images in [-1, 1], seeded as the original txt2img.py."""
    generator = make_generators(seed, n_samples, seed_mode)
    shape = latent_shape(model, n_samples, height, width)
    x_T = randn(shape, generator) if fixed_code else None
    out = []
    for _ in range(n_iter):
        x = x_T if x_T is not None else randn(shape, generator)
        steps = txt2img_steps(model, prompt, n_samples=n_samples, height=height, width=width,
                              generator=generator, x_T=x, **kwargs)
        out.append(decode(model, drain(steps, x)))
    return out


def img2img(model: LatentDiffusion, init_image: torch.Tensor, prompt: Prompts, *, seed: int = 42,
            n_iter: int = 1, n_samples: int = 1, seed_mode: str = "original", **kwargs) -> list[torch.Tensor]:
    """`n_iter` batches of `n_samples` variations of `init_image` (1, 3, H, W) in [-1, 1]."""
    generator = make_generators(seed, n_samples, seed_mode)
    init_latent = encode_image(model, init_image.repeat(n_samples, 1, 1, 1), generator)
    out = []
    for _ in range(n_iter):
        steps = img2img_steps(model, init_latent, prompt, generator=generator, **kwargs)
        out.append(decode(model, drain(steps, init_latent)))
    return out


# The special checkpoints' pipelines live in their own modules and import this one: reached lazily from here.
_SPECIAL = {"inpaint": "inpainting", "inpaint_steps": "inpainting", "depth2img": "depth",
            "depth2img_steps": "depth", "upscale": "upscaling", "upscale_steps": "upscaling"}


def __getattr__(name: str):
    if name in _SPECIAL:
        import importlib

        return getattr(importlib.import_module(f"ldm.{_SPECIAL[name]}"), name)
    raise AttributeError(f"module 'ldm.pipeline' has no attribute {name!r}")
