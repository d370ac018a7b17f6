"""4x upscaling with the x4 upscaler checkpoint, as the original `scripts/gradio/superresolution.py`
(`predict`, `paint`, `make_batch_sd`, `make_noise_augmentation`):

    lr          the low-res image in [-1, 1], [n, 3, h, w]; the latent is h x w too (the f=4 VAE makes 4h x 4w)
    c_concat    lr noised to `noise_level` on its own schedule (`model.low_scale_model`, levels 0..350)
    y           the noise level, the UNet's class label; both guided halves get the same c_concat and y
    x_T         numpy RandomState(seed).randn(n, 4, h, w) (`pipeline.NumpyStartCodes`)
    sampling    v-prediction on the 1e-4..2e-2 linear schedule; DDIM's "uniform" spacing turns the
                default 75 steps into 77 (range(0, 1000, 1000 // 75))

Draws from the torch generator, per batch: the augmentation noise (`randn_like(lr)`, in the (h, w, c) order
of the script's channels-last lr), then the sampler's.
Defaults are the gradio script's: DDIM, 75 steps, scale 10, eta 0.0 (another sampler: its own eta), noise
level 20.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch

from samplers import Step, drain
from samplers.noise import Generators, randn
from samplers.registry import resolve_sampler
from samplers.spaces import start_for

from .inpainting import require, sampler_options
from .loading import LatentDiffusion
from .pipeline import NumpyStartCodes, Prompts, _batch, _checked, _denoiser, decode, make_generators

FAMILIES = ("x4_upscaler",)
NOISE_LEVEL, STEPS, SCALE = 20, 75, 10.0


def check_noise_level(model: LatentDiffusion, noise_level: int) -> int:
    top = model.low_scale_model.max_noise_level if model.low_scale_model is not None else 350
    if isinstance(noise_level, bool) or int(noise_level) != noise_level or not 0 <= noise_level <= top:
        raise ValueError(f"noise_level must be an integer in 0..{top}, got {noise_level}")
    return int(noise_level)


def channels_last_noise(shape: tuple[int, int, int, int], generator: Generators) -> torch.Tensor:
    """Unit noise as the script's `randn_like(lr)` draws it: its lr is a channels-last view (`rearrange(image,
    'h w c -> 1 c h w')`), randn_like keeps those strides, and torch fills a tensor that is not contiguous one
    value at a time in memory order, (n, h, w, c), a stream that differs from `torch.randn`'s (which draws
    contiguous tensors 16 values at a time). Filling a tensor of the same strides gives the same noise."""
    n, c, h, w = shape
    gens = [generator] if generator is None or isinstance(generator, torch.Generator) else list(generator)

    def draw(k: int, g) -> torch.Tensor:
        return torch.empty((k, h, w, c), dtype=torch.float32).permute(0, 3, 1, 2).normal_(generator=g)

    return draw(n, gens[0]) if len(gens) == 1 else torch.cat([draw(1, g) for g in gens])


@torch.no_grad()
def upscale_conditioning(model: LatentDiffusion, image: torch.Tensor, n: int, noise_level: int,
                         generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_concat, y): the low-res image noised to `noise_level` (one draw of its shape from `generator`), and
    the level per sample."""
    if model.low_scale_model is None:
        raise ValueError("this model has no low_scale_model (the x4 upscaler's noise augmentation)")
    lr = image.float().expand(n, *image.shape[1:])
    level = torch.full((n,), check_noise_level(model, noise_level), dtype=torch.long)
    x_aug, level = model.low_scale_model(lr, level, noise=channels_last_noise(lr.shape, generator))
    return x_aug.to(model.placement.device), level.to(model.placement.device)


@torch.no_grad()
def upscale_steps(model: LatentDiffusion, image: torch.Tensor, prompt: Prompts, *, noise_level: int = NOISE_LEVEL,
                  negative_prompt: Prompts = "", n_samples: int = 1, steps: int = STEPS, sampler: str = "ddim",
                  schedule: Optional[str] = None, scale: float = SCALE, eta: Optional[float] = None,
                  generator: Generators = None, x_T: Optional[torch.Tensor] = None,
                  prompt_syntax: str = "original") -> Iterator[Step]:
    """The sampler's steps of a 4x upscale of `image` ((1 or n, 3, h, w) in [-1, 1]); the last `x_next` is the
    latent (h x w, decoding to 4h x 4w). x_T: unit start noise (the script's numpy one:
    `NumpyStartCodes(seed, n).draw((n, 4, h, w))`; drawn from `generator` when not given)."""
    require(model, FAMILIES, "upscale")
    spec = resolve_sampler(sampler, schedule)
    options = sampler_options(model, spec, eta)
    n = n_samples
    if x_T is None:
        x_T = randn((n, model.config.vae.embed_dim, *image.shape[-2:]), generator)
    c_concat, y = upscale_conditioning(model, image, n, noise_level, generator)
    denoise = _denoiser(model, spec, _batch(prompt, n), _batch(negative_prompt, n), scale, c_concat=c_concat, y=y,
                        prompt_syntax=prompt_syntax, steps=steps)
    x, sched = start_for(spec, x_T.to(model.placement.device), model.alphas_cumprod, steps)
    yield from _checked(spec.fn(denoise, x, sched, generator=generator, **options), denoise)


def upscale(model: LatentDiffusion, image: torch.Tensor, prompt: Prompts, *, seed: int = 42, n_iter: int = 1,
            n_samples: int = 1, seed_mode: str = "original", **kwargs) -> list[torch.Tensor]:
    """`n_iter` batches of `n_samples` 4x upscales in [-1, 1], seeded as the script: x_T from numpy's
    RandomState(seed), the augmentation and sampler noise from a torch generator seeded `seed`."""
    generator = make_generators(seed, n_samples, seed_mode)
    codes = NumpyStartCodes(seed, n_samples, seed_mode)
    out = []
    for _ in range(n_iter):
        x_T = codes.draw((n_samples, model.config.vae.embed_dim, *image.shape[-2:]))
        steps = upscale_steps(model, image, prompt, n_samples=n_samples, generator=generator, x_T=x_T, **kwargs)
        out.append(decode(model, drain(steps, x_T)))
    return out
