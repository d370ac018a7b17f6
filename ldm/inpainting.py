"""Inpainting with the SD 1.5 and SD 2 inpainting checkpoints, as their original scripts do it
(runwayml `scripts/inpaint_st.py` and Stability's `scripts/streamlit/inpainting.py`, `make_batch_sd` and
`inpaint`):

    mask        L image / 255, then >= 0.5 -> 1 (repaint), < 0.5 -> 0 (keep)
    masked      image * (mask < 0.5)
    c_concat    [mask resized to the latent (nearest), scale_factor * posterior SAMPLE of the masked image]
    x_T         numpy RandomState(seed).randn(n, 4, h, w) (`pipeline.NumpyStartCodes`), not torch's generator
    both guided halves get the same c_concat; the unconditional text is the empty prompt

Draws from the torch generator, per batch: the masked image's posterior sample, then the sampler's noise.
(Neither script seeds torch; the reference fixtures seed it right before `inpaint()`, which is what a
seeded generator here reproduces.) Defaults are those of the family's script: DDIM, 50 steps, eta 1.0
and scale 7.5 for SD 1.5 (runwayml hard-codes eta 1.0), eta 0.0 and scale 10.0 for SD 2.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F

from samplers import Step, drain
from samplers.noise import Generators
from samplers.registry import resolve_sampler
from samplers.spaces import start_for

from .loading import LatentDiffusion
from .pipeline import (NumpyStartCodes, Prompts, _batch, _checked, _denoiser, _options, decode, encode_image,
                       latent_shape, make_generators)

FAMILIES = ("sd1_inpaint", "sd2_inpaint")
ETA = {"sd1_inpaint": 1.0, "sd2_inpaint": 0.0}     # runwayml hard-codes 1.0; SD 2 streamlit's default 0.0
SCALE = {"sd1_inpaint": 7.5, "sd2_inpaint": 10.0}  # the scripts' slider defaults
STEPS = 50


def require(model: LatentDiffusion, families: tuple[str, ...], what: str) -> None:
    if model.family not in families:
        raise ValueError(f"{what} needs a {' or '.join(families)} checkpoint; this one is {model.family}")


def sampler_options(model: LatentDiffusion, spec, eta: Optional[float]) -> dict:
    """The sampler's options for `eta`: as given, or when None the family script's for DDIM (the scripts'
    sampler: 1.0 for SD 1.5 inpainting, else 0.0) and the sampler's own default for any other."""
    if eta is None and spec.name == "ddim":
        eta = ETA.get(model.family, 0.0)
    return {} if eta is None else _options(spec, eta)


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """A mask in [0, 1] as the scripts make it: 1 (repaint) where >= 0.5, else 0, float32."""
    return (mask.float() >= 0.5).to(torch.float32)


@torch.no_grad()
def inpaint_conditioning(model: LatentDiffusion, image: torch.Tensor, mask: torch.Tensor, n: int,
                         generator: Generators) -> torch.Tensor:
    """c_concat [n, 1 + 4, h, w]: the binarised mask at latent size, then the masked image's scaled latent
    (one posterior draw from `generator` for the whole batch, as the script encodes its n copies at once)."""
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"the mask is {tuple(mask.shape[-2:])} but the image {tuple(image.shape[-2:])}; "
                         "resize one to the other")
    f = model.config.vae.downsampling_factor
    if image.shape[-2] % f or image.shape[-1] % f:
        raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of the VAE's factor {f}")
    mask = binarize(mask).expand(n, 1, *mask.shape[-2:])
    masked = image.float().expand(n, *image.shape[1:]) * (mask < 0.5)
    latent = encode_image(model, masked, generator)
    small = F.interpolate(mask, size=latent.shape[-2:]).to(latent.device)  # mode "nearest", as the scripts
    return torch.cat([small, latent], dim=1)


@torch.no_grad()
def inpaint_steps(model: LatentDiffusion, image: torch.Tensor, mask: torch.Tensor, prompt: Prompts, *,
                  negative_prompt: Prompts = "", n_samples: int = 1, steps: int = STEPS, sampler: str = "ddim",
                  schedule: Optional[str] = None, scale: Optional[float] = None, eta: Optional[float] = None,
                  generator: Generators = None, x_T: Optional[torch.Tensor] = None,
                  prompt_syntax: str = "original") -> Iterator[Step]:
    """The sampler's steps repainting where `mask` is 1; the last `x_next` is the latent.

    image: (1 or n, 3, H, W) in [-1, 1], H and W multiples of the VAE's factor; mask: (1 or n, 1, H, W) in
    [0, 1]. x_T: unit start noise (the scripts' numpy one: `NumpyStartCodes(seed, n).draw(shape)`; drawn
    from `generator` when not given). scale, eta: None for the family script's defaults (`sampler_options`)."""
    require(model, FAMILIES, "inpaint")
    scale = SCALE.get(model.family, 7.5) if scale is None else scale
    spec = resolve_sampler(sampler, schedule)
    options = sampler_options(model, spec, eta)
    n = n_samples
    if x_T is None:
        from samplers.noise import randn

        x_T = randn(latent_shape(model, n, *image.shape[-2:]), generator)
    c_concat = inpaint_conditioning(model, image, mask, n, generator)
    denoise = _denoiser(model, spec, _batch(prompt, n), _batch(negative_prompt, n), scale, c_concat=c_concat,
                        prompt_syntax=prompt_syntax, steps=steps)
    x, sched = start_for(spec, x_T.to(model.placement.device), model.alphas_cumprod, steps)
    yield from _checked(spec.fn(denoise, x, sched, generator=generator, **options), denoise)


def inpaint(model: LatentDiffusion, image: torch.Tensor, mask: torch.Tensor, prompt: Prompts, *, seed: int = 0,
            n_iter: int = 1, n_samples: int = 1, seed_mode: str = "original", **kwargs) -> list[torch.Tensor]:
    """`n_iter` batches of `n_samples` inpaintings in [-1, 1], seeded as the scripts: x_T from numpy's
    RandomState(seed), the posterior sample and the sampler's noise from a torch generator seeded `seed`."""
    generator = make_generators(seed, n_samples, seed_mode)
    codes = NumpyStartCodes(seed, n_samples, seed_mode)
    out = []
    for _ in range(n_iter):
        x_T = codes.draw(latent_shape(model, n_samples, *image.shape[-2:]))
        steps = inpaint_steps(model, image, mask, prompt, n_samples=n_samples, generator=generator, x_T=x_T,
                              **kwargs)
        out.append(decode(model, drain(steps, x_T)))
    return out
