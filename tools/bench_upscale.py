"""tools/bench.py's upscale rows: the x4 upscaler (its official layout and config), a whole 4x upscale by
`ldm.pipeline.upscale` against diffusers' StableDiffusionUpscalePipeline on the same weights. `bench`
arguments are bench.py's Bench (not imported here: bench.py imports this module).
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch

from bench_networks import (PROMPT, Spec, diffusers_networks, dtype_name, ldm_networks, max_abs_diff, place_both,
                            random_checkpoint, size, spec, write_clip_tokenizer)


def low_scale_model(s: Spec, state: dict):
    """ldm's noise augmentation of the x4 upscaler, as ldm.load builds it: the config's module with the
    file's `low_scale_model.*` schedule buffers."""
    from models.upscaling import ImageConcatWithNoiseAugmentation
    from weights import sub_state

    module = ImageConcatWithNoiseAugmentation.from_config(s.cfg.extra["low_scale"])
    module.load_state_dict({k: v.float() for k, v in sub_state(state, "low_scale_model.").items()}, strict=True)
    return module


def upscale_row(bench, s: Spec, nets: dict, refs: dict, low_scale, image: int, dtype: torch.dtype,
                tokenizer_dir: Path) -> None:
    """`ldm.pipeline.upscale` against diffusers' StableDiffusionUpscalePipeline: the low-res image (image x
    image) noise-augmented to the default level on the upscaler's own schedule, then `--steps` DDIM steps of
    the v-prediction UNet with guidance (the script's scale, 10), then the f=4 decode to 4*image. ldm draws
    its start code from numpy (RandomState(seed)) and the augmentation noise from a torch generator seeded
    `seed` (channels-last, as the script's randn_like); diffusers is handed both, its `latents` and, through
    its low-res scheduler's add_noise, the unit noise, so it computes the augmentation itself from the same
    draw. Its schedulers are the upscaler's published ones: the original's "linear" schedules (linspace of
    the square roots, squared) are diffusers' "scaled_linear"."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    from ldm import LatentDiffusion
    from ldm.device import Placement
    from ldm.pipeline import NumpyStartCodes, upscale
    from ldm.upscaling import NOISE_LEVEL, SCALE, channels_last_noise
    from models.tokenizer import tokenizer_for
    from samplers.schedule import ddim_timesteps, linear_alphas_cumprod

    cfg, steps, seed, device = s.cfg, bench.args.steps, 42, bench.device
    low = cfg.extra["low_scale"]
    model = LatentDiffusion(
        family="x4_upscaler", config=cfg, unet=nets["unet"], vae=nets["vae"], text_encoder=nets["text"],
        tokenizer=tokenizer_for(cfg.text), placement=Placement(device, dtype), low_scale_model=low_scale,
        alphas_cumprod=linear_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps))
    scheduler = DDIMScheduler(beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear",
                              num_train_timesteps=cfg.timesteps, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="v_prediction")
    schedule = low.get("noise_schedule_config") or {}
    low_res = DDPMScheduler(beta_start=schedule.get("linear_start", 1e-4), beta_end=schedule.get("linear_end", 2e-2),
                            beta_schedule="scaled_linear", num_train_timesteps=schedule.get("timesteps", 1000))
    pipe = StableDiffusionUpscalePipeline(
        vae=refs["vae"], text_encoder=refs["text"], unet=refs["unet"], low_res_scheduler=low_res, scheduler=scheduler,
        tokenizer=write_clip_tokenizer(tokenizer_dir, cfg.text.pad_token), safety_checker=None,
        feature_extractor=None, watermarker=None, max_noise_level=low.get("max_noise_level", 350))
    pipe.set_progress_bar_config(disable=True)

    g = torch.Generator().manual_seed(7)
    image01 = torch.rand(1, 3, image, image, generator=g)  # the low-res image in [0, 1], as diffusers takes it
    lowres = 2.0 * image01 - 1.0  # what diffusers' preprocessing makes of it, and what ldm takes
    x_T = NumpyStartCodes(seed, 1).draw((1, cfg.vae.embed_dim, image, image))
    noise = channels_last_noise(tuple(lowres.shape), torch.Generator().manual_seed(seed))
    # the schedules the two libraries noise the low-res image with (a mismatch shows here, not as a vague diff)
    levels = {"ldm": low_scale.sqrt_alphas_cumprod.float(), "diffusers": low_res.alphas_cumprod.float().sqrt()}

    def add_noise(original, _noise, timesteps):  # diffusers' own add_noise, on the draw ldm makes
        return DDPMScheduler.add_noise(low_res, original, noise.to(original.device, original.dtype), timesteps)

    low_res.add_noise = add_noise
    ran = len(ddim_timesteps(steps, cfg.timesteps))
    if ran != steps:
        bench.note(f"upscale: the original DDIM spacing runs {ran} steps for --steps {steps}, diffusers' {steps}: "
                   "the two outputs differ (choose a divisor of 1000 to compare them)")

    def ours():
        return ((upscale(model, lowres, PROMPT, seed=seed, steps=steps, sampler="ddim", scale=SCALE, eta=0.0,
                         noise_level=NOISE_LEVEL)[0] + 1) / 2).clamp(0, 1)

    def theirs():
        return pipe(PROMPT, image=image01.to(device), num_inference_steps=steps, guidance_scale=SCALE,
                    noise_level=NOISE_LEVEL, eta=0.0, latents=x_T.to(device, dtype), output_type="pt").images

    f = cfg.vae.downsampling_factor
    bench.compare("upscale", f"{s.name} upscale {image}->{image * f} {steps} ddim {dtype_name(dtype)}", ours, theirs,
                  dtype=dtype_name(dtype), size=image, out_size=image * f, steps=steps, noise_level=NOISE_LEVEL,
                  low_res_schedule_max_abs_diff=max_abs_diff(levels["ldm"], levels["diffusers"]))


def upscale_rows(bench, args, shared: Path, dtypes: list, tmp: Path) -> None:
    s = spec("x4_upscaler", args.tiny, shared)
    state = random_checkpoint(s)  # all of it: the three networks and the low-res noise schedule
    nets, refs, low_scale = ldm_networks(s, state), diffusers_networks(s, state), low_scale_model(s, state)
    del state
    gc.collect()
    for dtype in dtypes:
        place_both(nets, refs, bench.device, dtype, args)
        upscale_row(bench, s, nets, refs, low_scale, size(args, args.upscale_size), dtype, tmp)
    del nets, refs
    gc.collect()
