"""The flags of the original scripts/txt2img.py and scripts/img2img.py, and every check that can be made
before any weights are read: each failure is one line that says what to do (exit code 2).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from models.config import from_yaml
from samplers.registry import SamplerSpec, available, resolve_sampler
from samplers.schedule import ddim_timesteps
from samplers.sigmas import SCHEDULES

from .builtin import CHECKPOINT as BUILTIN, DEFAULT_CKPT, SCALE as BUILTIN_SCALE, is_builtin, native_size
from .builtin import resolve_checkpoint
from .device import Placement, resolve
from .errors import UsageError
from .images import load_image
from .loading import LatentDiffusion
from .prompt_file import PromptLine, check_prompt_syntax, read_prompts
from .prompts import SYNTAXES

COMMANDS = ("txt2img", "img2img")
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
GET_A_CHECKPOINT = ("download an official checkpoint (e.g. v1-5-pruned-emaonly.safetensors from "
                    "huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5) and pass it with --ckpt")
SEED_MODES = ("original", "per-sample")
TEXT_TO_IMAGE_FAMILIES = ("sd1", "sd2")
# Flags of the original scripts (CompVis and Stability-AI) that have no counterpart here.
UNSUPPORTED = {
    "laion400m": "--laion400m is not supported: the LAION-400M model is a latent-diffusion checkpoint, "
                 "not Stable Diffusion",
    "dpm_solver": "--dpm_solver is not supported; use --sampler dpmpp_2m (DPM-Solver++ 2M)",
    "dpm": "--dpm is not supported; use --sampler dpmpp_2m (DPM-Solver++ 2M)",
    "torchscript": "--torchscript is not supported; drop it (the networks run as plain PyTorch modules)",
    "ipex": "--ipex is not supported; drop it (use --dtype bfloat16 for bfloat16 on the CPU)",
}
IMG2IMG_UNSUPPORTED = {
    "H": "--H is not an img2img flag: the size comes from --init-img (cut to multiples of 32); resize the "
         "image instead",
    "W": "--W is not an img2img flag: the size comes from --init-img (cut to multiples of 32); resize the "
         "image instead",
    "fixed_code": "--fixed_code has no effect in img2img: it starts from the init image (the original "
                  "accepts the flag and ignores it); drop it",
}


@dataclass(frozen=True)
class InitImage:
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1], H and W cut to multiples of 32
    note: Optional[str]  # how it was resized (None: it was not)
    sha256: str          # of the file, for the PNG metadata


@dataclass(frozen=True)
class RunPlan:
    """What `validate` found: all a run needs besides the model, with no weights read yet."""
    spec: SamplerSpec
    batches: list[list[str]]  # the prompts, n_samples to a batch (the last may be short)
    init: Optional[InitImage]  # img2img's input image
    height: int                # of the images: --H/--W, or the init image's
    width: int
    placement: Placement
    ckpt: Path
    lines: tuple = ()          # per batch, a PromptLine or None (empty: no A1111 lines)

    def line(self, batch: int) -> PromptLine:
        return (self.lines[batch] if batch < len(self.lines) else None) or PromptLine()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage plus a line and exits; we want the one line
        raise UsageError(f"{message} (see --help)")


def build_parser(command: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    img = command == "img2img"
    p = _Parser(prog=prog or f"python -m ldm {command}",
                description="make variations of an input image" if img else "images from a text prompt",
                epilog=f"Flags follow the original scripts/{command}.py. Not supported here: "
                       + ", ".join(f"--{flag}" for flag in [*UNSUPPORTED, *(IMG2IMG_UNSUPPORTED if img else ())])
                       + ".")
    a = p.add_argument
    a("--prompt", default=DEFAULT_PROMPT, help="the prompt to render")
    a("--negative-prompt", "--negative_prompt", dest="negative_prompt", default="",
      help="what to steer away from: replaces the empty prompt of classifier-free guidance")
    if img:
        a("--init-img", "--init_img", dest="init_img", help="path to the input image (cut to multiples of 32)")
        a("--strength", type=float, default=0.75,
          help="how much to noise the init image: 0 keeps it, 1.0 destroys it (t_enc = int(strength * steps))")
    a("--outdir", default=f"outputs/{command}-samples", help="folder to write results to")
    a("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    a("--skip_save", action="store_true", help="do not save individual samples")
    a("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=50, help="number of sampling steps")
    a("--sampler", default=None,
      help=f"sampler (default ddim): {', '.join(available())}, or an A1111 name such as \"Euler a\" or "
           "\"DPM++ 2M Karras\"" + ("; PLMS img2img works here, the original refuses it" if img else ""))
    a("--schedule", default=None, choices=SCHEDULES,
      help="noise levels of the k-diffusion samplers (default discrete: the model's own)")
    a("--seed-mode", "--seed_mode", dest="seed_mode", choices=SEED_MODES,
      default="original",
      help="original: one generator for the batch, as the original scripts; per-sample: image i has its "
           "own generator seeded seed + i, so it does not depend on the batch")
    a("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)"
                                          + ("; supported for img2img here" if img else ""))
    a("--ddim_eta", type=float, default=None,
      help="eta: the share of fresh noise per step (default: the sampler's own, 0.0 for DDIM as the original "
           "scripts, 1.0 for the ancestral k-samplers as k-diffusion and A1111)")
    a("--n_iter", type=int, default=1 if img else 2, help="sample this often")
    # img2img takes its size from the init image; the flags are kept only to say so
    size = "(default 512; the built-in model's own size with it)"
    a("--H", type=int, default=None, help=argparse.SUPPRESS if img else f"image height, in pixel space {size}")
    a("--W", type=int, default=None, help=argparse.SUPPRESS if img else f"image width, in pixel space {size}")
    a("--C", type=int, default=None, help="latent channels (default: the model's; must match it)")
    a("--f", type=int, default=None, help="downsampling factor of the VAE (default: the model's; must match it)")
    a("--n_samples", type=int, default=2 if img else 3,
      help="how many samples to produce for each given prompt, a.k.a. batch size")
    a("--n_rows", type=int, default=0,
      help="images per grid row (torchvision's nrow; default: n_samples)")
    a("--scale", type=float, default=None,
      help="unconditional guidance scale: eps = eps(x, uncond) + scale * (eps(x, cond) - eps(x, uncond)) "
           f"(default {5.0 if img else 7.5} as the original script; {BUILTIN_SCALE} with the built-in model)")
    a("--from-file", "--from_file", dest="from_file",
      help="read prompts from this file, one per line, batched by n_samples; a line in A1111's \"prompts from "
           "file\" form (--prompt \"...\" --negative_prompt \"...\" --seed N) is a batch of its own")
    add_prompt_flags(p)
    a("--repeat", type=int, default=1, help="repeat each prompt of --from-file this often")
    a("--config", default=None,
      help="the original YAML config (default: one beside the checkpoint, else detected from its keys)")
    a("--ckpt", default=None,
      help=f"checkpoint of the model (.ckpt or .safetensors); default {DEFAULT_CKPT} when it exists, else the "
           "built-in model of coloured shapes, which \"builtin\" names")
    a("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    a("--precision", choices=["full", "autocast"], default="autocast",
      help="full: float32; autocast: float16 on an accelerator, float32 on the CPU")
    a("--fixed_code", action="store_true",
      help=argparse.SUPPRESS if img else "use the same starting code for every batch")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    a("--dtype", default=None, help="float32, float16 or bfloat16 (wins over --precision)")
    a("--bf16", action="store_true", help="same as --dtype bfloat16")
    a("--prediction", choices=["eps", "v"], default=None,
      help="what the UNet predicts (default: from the config; SD 2 768-v models predict v)")
    a("--ema", action="store_true", help="use the EMA weights of the UNet (full training checkpoints)")
    a("--vae", default=None, help="a separate VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    a("--lowvram", action="store_true",
      help="keep the networks on the CPU and move each (the UNet block by block) to the GPU only while it runs; "
           "on a CPU-only run, skip the convolutions' reordered weight copies (less memory, slower)")
    a("--attention-slicing", "--attention_slicing", dest="attention_slicing", type=int, default=0,
      help="compute attention in N slices of queries: less memory on CPU/MPS (CUDA's kernels need none)")
    a("--compile", action="store_true",
      help="torch.compile the UNet: a minute or more of compiling first, then faster steps "
           "(CUDA, and long runs in bfloat16 on the CPU; in float32 on the CPU it was slower)")
    a("--vae-tiling", "--vae_tiling", dest="vae_tiling", action="store_true",
      help="decode and encode in overlapping 512-px tiles, blended: large images in little memory")
    for flag in UNSUPPORTED:
        a(f"--{flag}", action="store_true", help=argparse.SUPPRESS)
    return p


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
    """--prompt-syntax and --watermark, which every command that makes images takes."""
    p.add_argument("--prompt-syntax", "--prompt_syntax", dest="prompt_syntax", choices=SYNTAXES, default="original",
                   help="original: as the original scripts (77 tokens, brackets are text); a1111: as AUTOMATIC1111 "
                        "((word), [word], (word:1.3), BREAK, longer prompts, [from:to:when], [a|b])")
    p.add_argument("--watermark", action="store_true",
                   help="write the original scripts' invisible watermark (StableDiffusionV1 / SDV2) into every "
                        "image; needs pip install -e '.[watermark]' and images of at least 256x256")


# ---------------------------------------------------------------- checks before any weights are read
def _nearest_multiples(value: int, m: int) -> str:
    low = value - value % m
    return f"use {low} or {low + m}" if low > 0 else f"use {m}"


def _check_size(args, multiple: int, why: str) -> None:
    """--H and --W are whole latent pixels: multiples of the VAE's factor."""
    for flag in ("H", "W"):
        value = getattr(args, flag)
        if value < multiple or value % multiple:
            raise UsageError(f"--{flag} {value} is not a multiple of {multiple}; "
                             f"{_nearest_multiples(value, multiple)} ({why})")


def validate(command: str, args) -> RunPlan:
    """Check every flag and input file; return what the run needs. Reads no weights."""
    img = command == "img2img"
    for flag, message in UNSUPPORTED.items():
        if getattr(args, flag):
            raise UsageError(message)
    if img:
        for flag, message in IMG2IMG_UNSUPPORTED.items():
            if getattr(args, flag) not in (None, False):
                raise UsageError(message)
    for flag in ("scale", "ddim_eta", "strength"):  # argparse takes "nan" and "inf" as floats: a black image
        value = getattr(args, flag, None)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{flag} {value}: must be a finite number")
    default_scale(args, img)
    spec = check_sampler(args)
    sampler = spec.name
    if args.ddim_eta and not spec.takes("eta"):
        raise UsageError(f"--ddim_eta {args.ddim_eta}: the {sampler} sampler takes no eta; leave it at 0")
    if args.ddim_eta is None:  # "Euler a" with eta 0 would be plain Euler
        args.ddim_eta = float(spec.default("eta")) if spec.takes("eta") else 0.0
    if args.prompt is None and not args.from_file:
        raise UsageError("--prompt needs a text (or use --from-file)")
    for flag in ("n_samples", "n_iter", "repeat", "C", "f"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if not img:
        default_size(args)
    if not img and args.f is not None:  # without --f the model's own factor decides, after loading (check_model)
        _check_size(args, args.f, f"the factor --f {args.f} asks for")
    elif not img:
        for flag in ("H", "W"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag} {getattr(args, flag)}: must be a size in pixels, at least 1")
    check_steps(args)
    check_run_flags(args)
    if args.ddim_eta < 0:
        raise UsageError(f"--ddim_eta {args.ddim_eta}: must be 0 or more")
    if sampler == "plms" and args.ddim_eta != 0:
        raise UsageError(f"PLMS is deterministic: --ddim_eta must be 0 with it, got {args.ddim_eta}")
    if not 0 <= args.seed < 2 ** 64:
        raise UsageError(f"--seed {args.seed}: must be in 0..{2 ** 64 - 1}")
    if img and not 0.0 <= args.strength <= 1.0:
        raise UsageError(f"--strength {args.strength}: must be in [0.0, 1.0] (1.0 destroys the init image)")
    data, lines = read_prompts(args)
    check_prompt_syntax(args, data, lines)
    for line in lines:
        if line is not None and line.seed is not None and not 0 <= line.seed < 2 ** 64:
            raise UsageError(f"--from-file: --seed {line.seed}: must be in 0..{2 ** 64 - 1}")
    init = None
    if img:
        if not args.init_img:
            raise UsageError("--init-img is required: the image to start from")
        image, note = load_image(args.init_img, multiple=32)
        init = InitImage(image, note, hashlib.sha256(Path(args.init_img).read_bytes()).hexdigest())
    placement, ckpt = check_files(args)
    height, width = (args.H, args.W) if init is None else init.image.shape[2:]
    if args.watermark:
        from .watermark import check

        check(width, height)
    return RunPlan(spec, data, init, height, width, placement, ckpt, lines)


def _runs_builtin(args) -> bool:
    ckpt, _ = resolve_checkpoint(args.ckpt)
    return is_builtin(ckpt) and ckpt.is_file()


def default_size(args) -> None:
    """--H and --W left out: the built-in model's own size when it is the checkpoint, else 512 (the original's)."""
    side = native_size() if _runs_builtin(args) else 512
    args.H, args.W = (side if v is None else v for v in (args.H, args.W))


def default_scale(args, img: bool) -> None:
    """--scale left out: the built-in model's own when it is the checkpoint, else the original script's."""
    if args.scale is None:
        args.scale = BUILTIN_SCALE if _runs_builtin(args) else (5.0 if img else 7.5)


# The checks every command shares (the special ones of ldm/special_options.py too), in validate's order.
def check_sampler(args) -> SamplerSpec:
    """--sampler (or --plms) and --schedule as a SamplerSpec."""
    try:
        spec = resolve_sampler(args.sampler or ("plms" if args.plms else "ddim"), args.schedule)
    except ValueError as e:
        raise UsageError(f"--sampler {args.sampler}: {e}") from None
    if args.plms and spec.name != "plms":
        raise UsageError(f"--plms and --sampler {args.sampler} disagree; pass one of them")
    return spec


def check_steps(args) -> None:
    if args.ddim_steps < 1 or args.ddim_steps > 1000:
        raise UsageError(f"--ddim_steps {args.ddim_steps}: must be in 1..1000")
    try:
        ddim_timesteps(args.ddim_steps)
    except ValueError as e:
        raise UsageError(f"--ddim_steps {args.ddim_steps}: {e}") from None


def check_run_flags(args) -> None:
    """The memory and speed flags, --vae and --n_rows."""
    if args.compile and args.lowvram:
        raise UsageError("--compile and --lowvram do not go together (lowvram moves the UNet block by block); "
                         "pick one")
    if args.attention_slicing < 0:
        raise UsageError(f"--attention-slicing {args.attention_slicing}: must be 0 (off) or more")
    if args.vae is not None and not Path(args.vae).is_file():
        raise UsageError(f"{args.vae}: no such file; --vae takes a VAE checkpoint (.ckpt or .safetensors)")
    if args.n_rows < 0:
        raise UsageError(f"--n_rows {args.n_rows}: must be 0 (n_samples per row) or more")


def check_files(args) -> tuple[Placement, Path]:
    """The device and dtype, --config, --ckpt and --outdir (made and tried): (placement, checkpoint path)."""
    placement = resolve(args.device, "bfloat16" if args.bf16 and args.dtype is None else args.dtype,
                        args.precision)
    if args.config is not None and not Path(args.config).is_file():
        raise UsageError(f"{args.config}: no such file; --config takes the original YAML (v1-inference.yaml), "
                         "or leave it out to detect the model from the checkpoint")
    if args.config is not None:
        from_yaml(args.config)  # a config that cannot be read is one line now, not after the weights
    ckpt, note = resolve_checkpoint(args.ckpt)
    if is_builtin(ckpt) and not ckpt.is_file():
        raise UsageError(f"the built-in model is missing ({BUILTIN}): reinstall ldm (pip install -e .), or train it "
                         "again with python tools/train_tiny.py")
    if note:
        print(f"note: {note}")
    args.ckpt = str(ckpt)  # what the outputs record
    if ckpt.is_dir():
        raise UsageError(f"{ckpt}: is a folder; {GET_A_CHECKPOINT}")
    if not ckpt.is_file():
        raise UsageError(f"{ckpt}: no such file; {GET_A_CHECKPOINT}")
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"{outdir}: is a file; --outdir takes a folder")
    try:  # made now, as the original scripts do, and tried: not found unwritable after minutes of sampling
        outdir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=outdir).close()
    except OSError as e:
        raise UsageError(f"{outdir}: cannot be written here ({e.strerror or type(e).__name__}); pass another "
                         "--outdir") from None
    return placement, ckpt


def check_model(model: LatentDiffusion, args) -> None:
    """The flags that must agree with the loaded model."""
    if model.family not in TEXT_TO_IMAGE_FAMILIES:
        from .pipeline import PIPELINE_OF

        fits = PIPELINE_OF.get(model.family)
        use = f"; use it with `python -m ldm {fits}` (tools/{fits}.py)" if fits else ""
        raise UsageError(f"{Path(args.ckpt).name} is a {model.family} checkpoint; txt2img and img2img need a "
                         f"text-to-image model (SD 1.x or SD 2.x){use}")
    f, channels = model.config.vae.downsampling_factor, model.config.vae.embed_dim
    if args.f is not None and args.f != f:
        raise UsageError(f"--f {args.f} does not match the model: its VAE downsamples by {f}; pass --f {f} "
                         "or leave --f out")
    if args.C is not None and args.C != channels:
        raise UsageError(f"--C {args.C} does not match the model: its latents have {channels} channels; "
                         f"pass --C {channels} or leave --C out")
    if args.H is not None:  # img2img's size is the init image's, cut to multiples of 32
        _check_size(args, f, f"this model's VAE downsamples by {f}")
