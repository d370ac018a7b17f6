"""The flags of the inpaint, depth2img and upscale commands and every check that can be made before the
weights are read (the checkpoint's kind too, from its header): each failure is one line, exit code 2.

None of the original scripts has a command line (they are Streamlit and Gradio apps); the flags are the
txt2img/img2img ones that apply plus `--mask`, `--mask-from-alpha`, `--depth-map` and `--noise_level`, and
the defaults are each script's own (`DEFAULTS`). Sizes: inpaint and depth2img take any image whose sides are
multiples of 8 (others are cut down to them, with a note), where the scripts cut to multiples of 64 (and
Gradio's depth2img pads to them, at least 128); upscale takes any size, where Gradio pads to 64 as well.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from samplers.sigmas import SCHEDULES
from weights import CheckpointError, detect_family, read_header

from .errors import UsageError
from .loading import LatentDiffusion
from .options import (SEED_MODES, InitImage, RunPlan, _Parser, add_prompt_flags, check_files, check_run_flags,
                      check_sampler, check_steps)
from .prompt_file import check_prompt_syntax, read_prompts
from .pipeline import PIPELINE_OF
from .special_inputs import InputFile, load_depth_map, load_mask, mask_from_alpha, sha256

COMMANDS = ("inpaint", "depth2img", "upscale")
FAMILIES = {"inpaint": ("sd1_inpaint", "sd2_inpaint"), "depth2img": ("sd2_depth",), "upscale": ("x4_upscaler",)}
KIND = {"inpaint": "an inpainting checkpoint (sd-v1-5-inpainting.ckpt, 512-inpainting-ema.ckpt)",
        "depth2img": "the SD 2 depth checkpoint (512-depth-ema.ckpt)",
        "upscale": "the x4 upscaler checkpoint (x4-upscaler-ema.ckpt)"}
# The scripts' defaults: runwayml inpaint_st.py / SD 2 streamlit inpainting.py (scale and eta by family,
# see ldm/inpainting.py), gradio depth2img.py and superresolution.py.
DEFAULTS = {"inpaint": dict(steps=50, seed=0), "depth2img": dict(steps=50, seed=42, scale=9.0),
            "upscale": dict(steps=75, seed=42, scale=10.0)}
MULTIPLE = {"inpaint": 8, "depth2img": 8, "upscale": 1}
UPSCALE = 4


@dataclass(frozen=True)
class SpecialPlan(RunPlan):
    """A RunPlan (height/width: of the output images) plus the special inputs."""
    command: str = ""
    mask: Optional[InputFile] = None   # inpaint
    depth: Optional[InputFile] = None  # depth2img: a given depth map (None: the checkpoint's depth model)
    family: str = ""                   # from the checkpoint's header


def build_parser(command: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    d = DEFAULTS[command]
    what = {"inpaint": "repaint the masked part of an image", "depth2img": "re-render an image keeping its depth",
            "upscale": "upscale an image 4x"}[command]
    p = _Parser(prog=prog or f"python -m ldm {command}", description=what,
                epilog=f"Defaults follow the original script ({KIND[command]}).")
    a = p.add_argument
    a("--prompt", default="", help="the prompt to render")
    a("--negative-prompt", "--negative_prompt", dest="negative_prompt", default="",
      help="what to steer away from: replaces the empty prompt of classifier-free guidance")
    a("--init-img", "--init_img", dest="init_img",
      help="the image to upscale (any size)" if command == "upscale"
      else "the input image (sides cut to multiples of 8)")
    if command == "inpaint":
        a("--mask", help="mask image, white = repaint (L image / 255 >= 0.5); resized to the image if needed")
        a("--mask-from-alpha", "--mask_from_alpha", dest="mask_from_alpha", action="store_true",
          help="repaint where the init image is transparent (alpha <= 127) instead of a --mask file")
    if command == "depth2img":
        a("--depth-map", "--depth_map", dest="depth_map",
          help="8- or 16-bit grayscale PNG of the depth model's raw output, larger = nearer (default: the "
               "checkpoint's MiDaS model estimates it)")
        a("--strength", type=float, default=0.9,
          help="how much to noise the init image: t_enc = min(int(strength * steps), steps - 1)")
    if command == "upscale":
        a("--noise_level", "--noise-level", dest="noise_level", type=int, default=20,
          help="noise added to the low-res image, 0..350: higher lets the model invent more detail")
    a("--outdir", default=f"outputs/{command}-samples", help="folder to write results to")
    a("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    a("--skip_save", action="store_true", help="do not save individual samples")
    a("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=d["steps"],
      help=f"number of sampling steps (default {d['steps']}; DDIM's spacing may run a few more)")
    a("--sampler", default=None, help="sampler (default ddim); every sampler of txt2img works")
    a("--schedule", default=None, choices=SCHEDULES, help="noise levels of the k-diffusion samplers")
    a("--seed-mode", "--seed_mode", dest="seed_mode", choices=SEED_MODES, default="original",
      help="original: one generator for the batch, as the scripts; per-sample: image i seeded seed + i")
    a("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    a("--ddim_eta", type=float, default=None,
      help="DDIM eta (default: the script's, " + ("1.0 for SD 1.5 inpainting, 0.0 for SD 2" if command == "inpaint"
                                                   else "0.0") + ")")
    a("--n_iter", type=int, default=1, help="sample this often")
    a("--n_samples", type=int, default=1, help="images per batch")
    a("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    a("--scale", type=float, default=d.get("scale"),
      help="unconditional guidance scale (default: the script's" + (", 7.5 for SD 1.5 and 10.0 for SD 2)"
                                                                   if command == "inpaint" else f", {d['scale']})"))
    a("--from-file", "--from_file", dest="from_file", help="read prompts from this file, one per line (or A1111's "
      "\"prompts from file\" lines: --prompt \"...\" --negative_prompt \"...\" --seed N)")
    add_prompt_flags(p)
    a("--repeat", type=int, default=1, help="repeat each prompt of --from-file this often")
    a("--config", default=None, help="the original YAML config (default: one beside the checkpoint, or detected)")
    a("--ckpt", default=None, help=f"{KIND[command]} (.ckpt or .safetensors)")
    a("--seed", type=int, default=d["seed"], help=f"the seed (default {d['seed']})")
    a("--precision", choices=["full", "autocast"], default="autocast",
      help="full: float32; autocast: float16 on an accelerator, float32 on the CPU")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    a("--dtype", default=None, help="float32, float16 or bfloat16 (wins over --precision)")
    a("--bf16", action="store_true", help="same as --dtype bfloat16")
    a("--prediction", choices=["eps", "v"], default=None, help="what the UNet predicts (default: from the config)")
    a("--ema", action="store_true", help="use the EMA weights of the UNet (full training checkpoints)")
    a("--vae", default=None, help="a separate VAE file")
    a("--lowvram", action="store_true", help="keep the networks on the CPU, each lent to the GPU while it runs")
    a("--attention-slicing", "--attention_slicing", dest="attention_slicing", type=int, default=0,
      help="compute attention in N slices of queries")
    a("--compile", action="store_true", help="torch.compile the UNet")
    a("--vae-tiling", "--vae_tiling", dest="vae_tiling", action="store_true",
      help="decode and encode in overlapping tiles, blended: large images in little memory")
    return p


def _family_of(ckpt: Path) -> str:
    """The checkpoint's family from its header (tensor data is not read)."""
    try:
        return detect_family(read_header(ckpt), source=ckpt)
    except CheckpointError as e:
        raise UsageError(str(e)) from None


def wrong_kind(command: str, name: str, family: str) -> Optional[str]:
    """The one line for a checkpoint of the wrong kind, naming the command that fits it (None: it fits)."""
    if family in FAMILIES[command]:
        return None
    fits = PIPELINE_OF.get(family, "txt2img` or `python -m ldm img2img" if family in ("sd1", "sd2") else None)
    use = f"; use it with `python -m ldm {fits}`" if fits else ""
    return f"{name} is a {family} checkpoint; {command} needs {KIND[command]}{use}"


def validate(command: str, args) -> SpecialPlan:
    """Check every flag and input file, and the checkpoint's kind; return what the run needs. Reads no weights."""
    for flag in ("scale", "ddim_eta", "strength"):
        value = getattr(args, flag, None)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{flag} {value}: must be a finite number")
    spec = check_sampler(args)
    if args.ddim_eta is not None:
        if args.ddim_eta < 0:
            raise UsageError(f"--ddim_eta {args.ddim_eta}: must be 0 or more")
        if args.ddim_eta and not spec.takes("eta"):
            raise UsageError(f"--ddim_eta {args.ddim_eta}: the {spec.name} sampler takes no eta; leave it out")
    for flag in ("n_samples", "n_iter", "repeat"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    check_steps(args)
    check_run_flags(args)
    if args.scale is not None and args.scale < 0:
        raise UsageError(f"--scale {args.scale}: must be 0 or more")
    seeds = args.seed + (args.n_samples - 1 if args.seed_mode == "per-sample" else 0)
    if not 0 <= args.seed or seeds >= 2 ** 32:
        raise UsageError(f"--seed {args.seed}: must be in 0..{2 ** 32 - 1}, numpy's seeds, as the scripts' "
                         "seed_everything" + (" (per-sample mode uses seed + n_samples - 1 too)"
                                              if args.seed_mode == "per-sample" else ""))
    if command == "depth2img":
        if not 0.0 <= args.strength <= 1.0:
            raise UsageError(f"--strength {args.strength}: must be in [0.0, 1.0]")
        if min(int(args.strength * args.ddim_steps), args.ddim_steps - 1) < 1:
            raise UsageError(f"--strength {args.strength} with --ddim_steps {args.ddim_steps} runs no step "
                             "(int(strength * steps) = 0); raise either")
    if command == "upscale" and not 0 <= args.noise_level <= 350:
        raise UsageError(f"--noise_level {args.noise_level}: must be in 0..350 (the upscaler's max_noise_level)")
    if command == "inpaint" and bool(args.mask) == bool(args.mask_from_alpha):
        raise UsageError("inpaint needs a mask: pass --mask FILE (white = repaint) or --mask-from-alpha"
                         if not args.mask else "--mask and --mask-from-alpha: pass one of them")
    data, lines = read_prompts(args)
    check_prompt_syntax(args, data, lines)
    if any(line is not None and line.seed is not None and not 0 <= line.seed < 2 ** 32 for line in lines):
        raise UsageError("--from-file: a line's --seed must be in 0..4294967295 (numpy's seeds, as the scripts')")
    if not args.init_img:
        raise UsageError("--init-img is required: the " + ("image to upscale" if command == "upscale" else
                                                            "image to start from"))
    from .images import load_image  # the img2img reader: size cap, 16-bit and float images, decode errors

    image, note = load_image(args.init_img, multiple=MULTIPLE[command])
    init = InitImage(image, note, sha256(args.init_img))
    h, w = image.shape[-2:]
    mask = depth = None
    if command == "inpaint":
        mask = mask_from_alpha(args.init_img, (w, h)) if args.mask_from_alpha else load_mask(args.mask, (w, h))
    if command == "depth2img" and args.depth_map:
        depth = load_depth_map(args.depth_map)
    if args.ckpt is None:
        raise UsageError(f"--ckpt is required: {KIND[command]}")
    placement, ckpt = check_files(args)
    family = _family_of(ckpt)
    line = wrong_kind(command, ckpt.name, family)
    if line:
        raise UsageError(line)
    scale = UPSCALE if command == "upscale" else 1
    if args.watermark:
        from .watermark import check

        check(w * scale, h * scale)
    return SpecialPlan(spec, data, init, h * scale, w * scale, placement, ckpt, lines, command=command, mask=mask,
                       depth=depth, family=family)


def checker(plan: SpecialPlan):
    """`check(model, args)` for runtime.load_for_run: the kind again (a --config may say otherwise), the sizes
    against the model's factor, and the family script's defaults for what the flags left open (DDIM's eta:
    1.0 for SD 1.5 inpainting, else 0.0; another sampler without --ddim_eta keeps its own default)."""
    from .inpainting import ETA, SCALE

    command = plan.command

    def check(model: LatentDiffusion, args) -> None:
        line = wrong_kind(command, Path(args.ckpt).name, model.family)
        if line:
            raise UsageError(line)
        if command != "upscale":
            f = model.config.vae.downsampling_factor
            h, w = plan.init.image.shape[-2:]
            if h % f or w % f:
                raise UsageError(f"the image is {w}x{h}; this model's VAE needs sides that are multiples of {f}")
        if args.scale is None:
            args.scale = SCALE.get(model.family, 7.5)
        if args.ddim_eta is None and plan.spec.name == "ddim":  # other samplers keep their own default
            args.ddim_eta = ETA.get(model.family, 0.0)
    return check
