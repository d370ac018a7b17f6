"""depth2img with SD 2's depth checkpoint, as the original `scripts/gradio/depth2img.py` (`predict`, `paint`,
`make_batch_sd`; the streamlit script runs the same `paint`):

    depth       model.depth_model(AddMiDaS(image)) -> [n, 1, H', W'] (larger = nearer), or a given depth map
    c_concat    depth resized bicubic to the latent size, then per sample 2 (d - min) / (max - min) - 1
                (no epsilon: the script's own; the class's `get_input` adds 0.001, the e2e script does not)
    t_enc       min(int(strength * steps), steps - 1); strength 1.0 starts from pure noise instead
    start       x0 noised to DDIM step t_enc (stochastic_encode), then the last t_enc steps, as img2img

Draws from the torch generator, per batch (the script's `seed_everything` order): the init image's posterior
sample, the stochastic-encode noise (or, at strength 1, the starting noise), then the sampler's noise.
Defaults are the gradio script's: DDIM, 50 steps, scale 9.0, strength 0.9, eta 0.0 (another sampler:
its own eta).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from samplers import Step, drain
from samplers.noise import Generators, noise_like
from samplers.registry import resolve_sampler
from samplers.spaces import start_for

from .inpainting import require, sampler_options
from .loading import LatentDiffusion
from .pipeline import NonFiniteError, Prompts, _batch, _checked, _denoiser, decode, encode_image, make_generators

FAMILIES = ("sd2_depth",)
MIDAS_SIZE, MIDAS_MULTIPLE = 384, 32  # AddMiDaS('dpt_hybrid'): Resize(384, 384, keep_aspect_ratio, 'minimal', 32)


def midas_size(height: int, width: int) -> tuple[int, int]:
    """MiDaS's `Resize.get_size` ('minimal'): scale both sides by whichever of 384/h, 384/w is nearer 1, then
    round each to a multiple of 32 (numpy's round, half to even)."""
    sh, sw = MIDAS_SIZE / height, MIDAS_SIZE / width
    s = sw if abs(1 - sw) < abs(1 - sh) else sh
    return (int(np.round(s * height / MIDAS_MULTIPLE)) * MIDAS_MULTIPLE,
            int(np.round(s * width / MIDAS_MULTIPLE)) * MIDAS_MULTIPLE)


def midas_input(images: torch.Tensor) -> torch.Tensor:
    """AddMiDaS on images in [-1, 1]: to [0, 1], resized bicubic (cv2's INTER_CUBIC: no antialiasing, half-pixel
    centres) to `midas_size`, then (x - 0.5) / 0.5 -> [B, 3, H', W'] in about [-1, 1]."""
    x = (images.float() + 1.0) * 0.5
    x = F.interpolate(x, size=midas_size(*x.shape[-2:]), mode="bicubic", align_corners=False)
    return (x - 0.5) / 0.5


@torch.no_grad()
def estimate_depth(model: LatentDiffusion, images: torch.Tensor) -> torch.Tensor:
    """The depth model's raw output for images in [-1, 1]: [B, 1, H', W'], float32."""
    if model.depth_model is None:
        raise ValueError(f"{model.path.name if model.path else 'this model'} carries no depth model (no "
                         "depth_model.* weights): pass a depth map instead")
    p = next(model.depth_model.parameters())
    return model.depth_model(midas_input(images).to(p.device, p.dtype)).float()


def depth_display(depth: torch.Tensor) -> np.ndarray:
    """The first image the script returns: sample 0's depth scaled to its own range, (H', W') uint8."""
    d = depth[0, 0].float()
    return ((d - d.min()) / (d.max() - d.min())).cpu().numpy().__mul__(255.).astype(np.uint8)


def normalize_depth(depth: torch.Tensor, size: tuple[int, int], eps: float = 0.0) -> torch.Tensor:
    """c_concat: the depth resized bicubic to `size`, then 2 (d - min) / (max - min + eps) - 1 per sample.
    eps 0 is the depth2img scripts'; `LatentDepth2ImageDiffusion.get_input` (training) adds 0.001."""
    cc = F.interpolate(depth.float(), size=size, mode="bicubic", align_corners=False)
    lo, hi = torch.amin(cc, dim=[1, 2, 3], keepdim=True), torch.amax(cc, dim=[1, 2, 3], keepdim=True)
    if not eps and bool((hi == lo).any()):
        raise NonFiniteError("the depth map is flat (one value everywhere): it cannot be normalised to [-1, 1]")
    return 2. * (cc - lo) / (hi - lo + eps) - 1.


def depth_t_enc(strength: float, steps: int) -> int:
    """The script's `t_enc = min(int(strength * steps), steps - 1)`: strength 1.0 runs steps - 1 steps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    t_enc = min(int(strength * steps), steps - 1)
    if t_enc < 1:  # the script would decode the barely noised init latent and call it a result
        raise ValueError(f"strength {strength} with {steps} steps runs no step (int(strength * steps) = 0); "
                         "raise the strength or the steps")
    return t_enc


@torch.no_grad()
def depth2img_steps(model: LatentDiffusion, image: torch.Tensor, prompt: Prompts, *,
                    depth: Optional[torch.Tensor] = None, strength: float = 0.9, negative_prompt: Prompts = "",
                    n_samples: int = 1, steps: int = 50, sampler: str = "ddim", schedule: Optional[str] = None,
                    scale: float = 9.0, eta: Optional[float] = None,
                    generator: Generators = None, prompt_syntax: str = "original") -> Iterator[Step]:
    """The sampler's steps re-rendering `image` ((1 or n, 3, H, W) in [-1, 1]) with its depth kept.

    depth: the raw depth (larger = nearer), [1 or n, 1, H', W'] of any size; None: `estimate_depth`."""
    require(model, FAMILIES, "depth2img")
    spec = resolve_sampler(sampler, schedule)
    options = sampler_options(model, spec, eta)
    t_enc = depth_t_enc(strength, steps)
    n = n_samples
    z = encode_image(model, image.float().expand(n, *image.shape[1:]), generator)
    depth = estimate_depth(model, image[:1]) if depth is None else depth
    c_concat = normalize_depth(depth.expand(n, 1, *depth.shape[-2:]), tuple(z.shape[-2:])).to(z.device)
    denoise = _denoiser(model, spec, _batch(prompt, n), _batch(negative_prompt, n), scale, c_concat=c_concat,
                        prompt_syntax=prompt_syntax, steps=steps)
    noise = noise_like(z, generator)
    if strength == 1.0:  # the script's do_full_sample: randn_like(z) itself, then its t_enc = steps - 1 steps
        x, sched = start_for(spec, noise, model.alphas_cumprod, steps, t_start=t_enc)
    else:
        x, sched = start_for(spec, noise, model.alphas_cumprod, steps, x0=z, t_start=t_enc)
    yield from _checked(spec.fn(denoise, x, sched, generator=generator, **options), denoise)


def depth2img(model: LatentDiffusion, image: torch.Tensor, prompt: Prompts, *, seed: int = 42, n_iter: int = 1,
              n_samples: int = 1, seed_mode: str = "original", **kwargs) -> list[torch.Tensor]:
    """`n_iter` batches of `n_samples` images in [-1, 1], seeded as the script's `seed_everything(seed)`."""
    generator = make_generators(seed, n_samples, seed_mode)
    out = []
    for _ in range(n_iter):
        steps = depth2img_steps(model, image, prompt, n_samples=n_samples, generator=generator, **kwargs)
        out.append(decode(model, drain(steps, torch.empty(0))))  # t_enc >= 1: never the empty one
    return out
