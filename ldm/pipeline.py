"""txt2img and img2img as plain functions over a loaded model.

Each pipeline comes in two forms: `*_steps(...)` yields the sampler's `Step`s (look at `x`, `eps`,
`pred_x0` at any step, `break`, or replace `step.x_next`), and `txt2img(...)`/`img2img(...)` run
them to the end and decode. Randomness comes from one CPU `torch.Generator` in the original
scripts' order, so a seed gives the same image on every device and, on the CPU, the original's noise:
    txt2img: per iteration, x_T (unless a fixed x_T is given), then the sampler's per-step noise;
    img2img: once, the posterior sample of the init image; per iteration, the stochastic-encode
             noise, then the sampler's per-step noise.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional, Union

import torch

from samplers import SAMPLERS, Step, drain, make_denoiser, noise_like, stochastic_encode

from .loading import LatentDiffusion

Prompts = Union[str, list[str]]


def _batch(prompt: Prompts, n: int) -> list[str]:
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for a batch of {n}")
    return prompts


@torch.no_grad()
def encode_text(model: LatentDiffusion, prompts: list[str]) -> torch.Tensor:
    tokens = model.tokenizer(prompts).to(model.placement.device)
    return model.text_encoder(tokens)


@torch.no_grad()
def decode(model: LatentDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1], float32."""
    z = (latents / model.scale_factor).to(model.placement.device, model.placement.dtype)
    return model.vae.decode(z).float()


@torch.no_grad()
def encode_image(model: LatentDiffusion, images: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents, sampling the posterior as the original (one noise draw)."""
    posterior = model.vae.encode(images.to(model.placement.device, model.placement.dtype))
    return (model.scale_factor * posterior.sample(generator)).float()


def latent_shape(model: LatentDiffusion, n: int, height: int, width: int) -> tuple[int, int, int, int]:
    f = model.config.vae.downsampling_factor
    return (n, model.config.vae.embed_dim, height // f, width // f)


def _denoiser(model: LatentDiffusion, prompts: list[str], negative: list[str], scale: float):
    if model.parameterization is None:
        raise ValueError("the model's prediction type (eps or v) is not known; load it with prediction=\"eps\" or \"v\"")
    cond = encode_text(model, prompts)
    # The original encodes the empty string for the unconditional half, never zeros.
    uncond = encode_text(model, negative) if scale != 1.0 else None
    return make_denoiser(model.unet, cond, uncond, scale, model.parameterization, model.alphas_cumprod,
                         dtype=model.placement.dtype)


@torch.no_grad()
def txt2img_steps(model: LatentDiffusion, prompt: Prompts, *, negative_prompt: Prompts = "", n_samples: int = 1,
                  height: int = 512, width: int = 512, steps: int = 50, sampler: str = "plms",
                  scale: float = 7.5, eta: float = 0.0, generator: Optional[torch.Generator] = None,
                  x_T: Optional[torch.Tensor] = None) -> Iterator[Step]:
    """The sampler's steps for one batch of `n_samples` images; the last `x_next` is the latent."""
    denoise = _denoiser(model, _batch(prompt, n_samples), _batch(negative_prompt, n_samples), scale)
    device = model.placement.device
    if x_T is None:
        x_T = torch.randn(latent_shape(model, n_samples, height, width), generator=generator, dtype=torch.float32)
    yield from SAMPLERS[sampler](denoise, x_T.to(device), model.alphas_cumprod, steps, eta=eta, generator=generator)


def strength_to_steps(strength: float, steps: int) -> int:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return int(strength * steps)


@torch.no_grad()
def img2img_steps(model: LatentDiffusion, init_latent: torch.Tensor, prompt: Prompts, *, strength: float = 0.8,
                  negative_prompt: Prompts = "", steps: int = 50, sampler: str = "ddim", scale: float = 7.5,
                  eta: float = 0.0, generator: Optional[torch.Generator] = None) -> Iterator[Step]:
    """Noise `init_latent` (scaled, from `encode_image`) to `t_enc = int(strength * steps)` and denoise
    from there, as the original img2img: the last `t_enc` steps of the `steps`-step schedule.

    strength 1.0 (t_enc = steps) starts from the top of the schedule; the original crashes there
    (it indexes one past its DDIM table)."""
    t_enc = strength_to_steps(strength, steps)
    n = init_latent.shape[0]
    denoise = _denoiser(model, _batch(prompt, n), _batch(negative_prompt, n), scale)
    x0 = init_latent.to(model.placement.device)
    noise = noise_like(x0, generator)
    z = stochastic_encode(x0, model.alphas_cumprod, steps, min(t_enc, steps - 1), noise=noise)
    yield from SAMPLERS[sampler](denoise, z, model.alphas_cumprod, steps, eta=eta, generator=generator,
                                 t_start=t_enc)


def txt2img(model: LatentDiffusion, prompt: Prompts, *, seed: int = 42, n_iter: int = 1,
            fixed_code: bool = False, n_samples: int = 1, height: int = 512, width: int = 512,
            **kwargs) -> list[torch.Tensor]:
    """`n_iter` batches of `n_samples` images in [-1, 1], seeded as the original txt2img.py."""
    generator = torch.Generator().manual_seed(seed)
    shape = latent_shape(model, n_samples, height, width)
    x_T = torch.randn(shape, generator=generator, dtype=torch.float32) if fixed_code else None
    out = []
    for _ in range(n_iter):
        x = x_T if x_T is not None else torch.randn(shape, generator=generator, dtype=torch.float32)
        steps = txt2img_steps(model, prompt, n_samples=n_samples, height=height, width=width,
                              generator=generator, x_T=x, **kwargs)
        out.append(decode(model, drain(steps, x)))
    return out


def img2img(model: LatentDiffusion, init_image: torch.Tensor, prompt: Prompts, *, seed: int = 42,
            n_iter: int = 1, n_samples: int = 1, **kwargs) -> list[torch.Tensor]:
    """`n_iter` batches of `n_samples` variations of `init_image` (1, 3, H, W) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    init_latent = encode_image(model, init_image.repeat(n_samples, 1, 1, 1), generator)
    out = []
    for _ in range(n_iter):
        steps = img2img_steps(model, init_latent, prompt, generator=generator, **kwargs)
        out.append(decode(model, drain(steps, init_latent)))
    return out
