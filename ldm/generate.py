"""The txt2img and img2img commands (flags and checks in ldm/options.py).

`tools/txt2img.py`, `tools/img2img.py` and `python -m ldm txt2img|img2img` all run `main` here.
Images are seeded as `ldm.pipeline` documents, from one CPU generator:
    txt2img: x_T per batch (once before the loop with --fixed_code), then the sampler's noise;
    img2img: the init image's posterior sample once, then per batch the stochastic-encode noise
             and the sampler's noise.
Every PNG carries the A1111 `parameters` text and an `ldm` JSON with all that is needed to make it
again; both are deterministic, so the same command gives the same bytes.
"""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.layers import set_attention_slicing
from models.prepack import plain_linears, unpack_convolutions
from models.tiling import enable_vae_tiling
from samplers import drain
from samplers.noise import randn

from . import pipeline
from .cli import USER_ERRORS
from .device import Placement, configure_backends
from .images import a1111_parameters, make_grid, model_hash, save_png, to_uint8
from .loading import LatentDiffusion, find_config, load
from .offload import enable_lowvram
from .options import UsageError, a1111_sampler_name, build_parser, check_model, validate

__all__ = ["main", "run", "build_parser", "validate", "check_model", "UsageError"]


# ---------------------------------------------------------------- output

def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Writer:
    """Saves samples as they come and the grid at the end, each with its settings."""

    def __init__(self, command: str, args, plan: dict, model: LatentDiffusion, height: int, width: int):
        self.command, self.args, self.outdir = command, args, Path(args.outdir)
        self.hash = model_hash(plan["ckpt"])
        config = args.config or find_config(plan["ckpt"])
        self.base = {
            "command": command, "negative_prompt": args.negative_prompt, "seed": args.seed,
            "n_samples": args.n_samples, "n_iter": args.n_iter, "from_file": args.from_file,
            "repeat": args.repeat, "sampler": plan["sampler"], "schedule": plan["spec"].schedule,
            "seed_mode": args.seed_mode, "steps": args.ddim_steps, "eta": args.ddim_eta,
            "scale": args.scale, "H": height, "W": width, "C": args.C, "f": args.f,
            "ckpt": str(args.ckpt), "model_hash": self.hash, "config": None if config is None else str(config),
            "family": model.family, "device": str(model.placement.device),
            "dtype": str(model.placement.dtype).replace("torch.", ""), "precision": args.precision,
            "prediction": model.parameterization, "ema": args.ema, "vae": args.vae,
            "lowvram": args.lowvram, "attention_slicing": args.attention_slicing, "vae_tiling": args.vae_tiling,
            "compile": args.compile,
            "ldm_version": _version("ldm"), "torch_version": torch.__version__,
        }
        if command == "txt2img":
            self.base["fixed_code"] = args.fixed_code
        else:
            self.base.update(strength=args.strength, t_enc=pipeline.strength_to_steps(args.strength, args.ddim_steps),
                             init_image=str(args.init_img), init_image_sha256=plan["init"]["sha256"])
        self.sampler_label = a1111_sampler_name(plan["spec"])
        self.extra = {"Denoising strength": args.strength} if command == "img2img" else {}
        if args.seed_mode != "original":
            self.extra["Seed mode"] = args.seed_mode
        self.images: list[np.ndarray] = []
        self.samples: list[Path] = []
        self.grid: Optional[Path] = None
        self.first_prompt: Optional[str] = None

    def _parameters(self, prompt: str) -> str:
        b = self.base
        return a1111_parameters(prompt, b["negative_prompt"], b["steps"], self.sampler_label, b["scale"], b["seed"],
                                b["W"], b["H"], self.hash, Path(b["ckpt"]).stem, self.extra)

    def add(self, images: np.ndarray, iteration: int, batch: int, prompts: list[str]) -> None:
        if self.first_prompt is None:
            self.first_prompt = prompts[0]
        if not self.args.skip_grid:
            self.images.extend(images)
        if self.args.skip_save:
            return
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            settings = {**self.base, "prompt": prompt, "iteration": iteration, "batch": batch,
                        "index_in_batch": i, "batch_size": len(prompts)}
            self.samples.append(save_png(image, self.outdir / "samples", parameters=self._parameters(prompt),
                                         settings=settings))

    def finish(self, n_rows: int) -> None:
        if self.args.skip_grid or not self.images:
            return
        settings = {**self.base, "prompt": self.first_prompt, "grid": {"images": len(self.images), "n_rows": n_rows}}
        self.grid = save_png(make_grid(np.stack(self.images), n_rows), self.outdir,
                             parameters=self._parameters(self.first_prompt), settings=settings,
                             prefix="grid-", digits=4)


# ---------------------------------------------------------------- sampling

def _progress(steps, desc: str):
    """A tqdm bar over a sampler's steps, opened at the first Step, which knows how many there are."""
    bar = None
    try:
        for step in steps:
            if bar is None:
                bar = tqdm(total=step.total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
            yield step
            bar.update()
    finally:
        if bar is not None:
            bar.close()


def _label(n: int, b: int, args, data) -> str:
    parts = [f"iteration {n + 1}/{args.n_iter}"] + ([f"batch {b + 1}/{len(data)}"] if len(data) > 1 else [])
    return "Sampling (" + ", ".join(parts) + ")"


def _first(generators, k: int):
    """The batch's one generator, or (per-sample mode) the first k of its generators."""
    return generators if isinstance(generators, torch.Generator) else generators[:k]


def _run_txt2img(model, args, plan, writer, generators) -> None:
    shape = pipeline.latent_shape(model, args.n_samples, args.H, args.W)
    fixed = randn(shape, generators) if args.fixed_code else None
    for n in range(args.n_iter):
        for b, prompts in enumerate(plan["data"]):
            k, generator = len(prompts), _first(generators, len(prompts))
            x_T = fixed[:k] if fixed is not None else randn(pipeline.latent_shape(model, k, args.H, args.W), generator)
            steps = pipeline.txt2img_steps(model, prompts, negative_prompt=args.negative_prompt, n_samples=k,
                                           height=args.H, width=args.W, steps=args.ddim_steps,
                                           sampler=plan["sampler"], schedule=plan["spec"].schedule,
                                           scale=args.scale, eta=args.ddim_eta, generator=generator, x_T=x_T)
            latents = drain(_progress(steps, _label(n, b, args, plan["data"])), x_T)
            writer.add(to_uint8(pipeline.decode(model, latents)), n, b, prompts)


def _run_img2img(model, args, plan, writer, generators) -> None:
    init = plan["init"]["image"].repeat(args.n_samples, 1, 1, 1)
    init_latent = pipeline.encode_image(model, init, generators)
    print(f"target t_enc is {pipeline.strength_to_steps(args.strength, args.ddim_steps)} steps")
    for n in range(args.n_iter):
        for b, prompts in enumerate(plan["data"]):
            x0, generator = init_latent[:len(prompts)], _first(generators, len(prompts))
            steps = pipeline.img2img_steps(model, x0, prompts, strength=args.strength,
                                           negative_prompt=args.negative_prompt, steps=args.ddim_steps,
                                           sampler=plan["sampler"], schedule=plan["spec"].schedule,
                                           scale=args.scale, eta=args.ddim_eta, generator=generator)
            latents = drain(_progress(steps, _label(n, b, args, plan["data"])), x0)
            writer.add(to_uint8(pipeline.decode(model, latents)), n, b, prompts)


def compile_unet(unet: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile for sampling. On the CPU with freezing: inductor folds the weights in as constants (a bf16
    512x512 CFG step 1.36 s against 2.59 s eager on 2 threads of an AMX Xeon, after 91 s of compiling). In
    float32 on a 2-core AVX2 EPYC it lost: 5.5 s against 3.2 s eager at 256x256, its convolutions reordering
    their weights on every call where ldm's eager ones are prepacked. On CUDA the plain mode is the one
    measured (README)."""
    unpack_convolutions(unet), plain_linears(unet)  # the compiler picks its own kernels; it cannot trace ours
    return torch.compile(unet, options={"freezing": True} if device.type == "cpu" else None)


def load_for_run(args, plan) -> LatentDiffusion:
    """ldm.load with the memory options: --lowvram loads onto the CPU in the compute dtype and lends each
    network to the accelerator only while it runs; --attention-slicing and --vae-tiling bound the peaks."""
    placement = plan["placement"]
    offload = args.lowvram and placement.device.type != "cpu"
    where = Placement(torch.device("cpu"), placement.dtype, placement.notes) if offload else placement
    model = load(plan["ckpt"], config=args.config, device=where, ema=args.ema, prediction=args.prediction,
                 vae=args.vae)
    if offload:
        configure_backends(placement)
        enable_lowvram(model, placement.device)
    elif args.lowvram:
        model.notes.append("--lowvram has no effect on the CPU")
    if args.attention_slicing:
        set_attention_slicing(model.unet, args.attention_slicing)
        set_attention_slicing(model.vae, args.attention_slicing)
    if args.vae_tiling:
        enable_vae_tiling(model.vae)
    if args.compile:
        model.unet = compile_unet(model.unet, placement.device)  # compiled on the first step; shapes are fixed per run
        if placement.device.type == "cpu" and placement.dtype == torch.float32:
            model.notes.append("--compile in float32 on the CPU was measured slower than without it (AVX2: 5.5 s "
                               "against 3.2 s a 256x256 step); it pays in bfloat16, on CPUs that have it")
    return model


def run(command: str, args) -> int:
    """Validate, load, sample, save; the exit code. Raises UsageError (and the loaders' errors)."""
    plan = validate(command, args)
    height, width = (args.H, args.W) if plan["init"] is None else plan["init"]["image"].shape[2:]
    if plan["init"] is not None:
        print(plan["init"]["note"] or f"loaded input image of size {width}x{height} from {args.init_img}")
    print(f"Loading model from {plan['ckpt']}")
    model = load_for_run(args, plan)
    check_model(model, args)
    for note in model.notes:
        print(f"note: {note}")
    dtype = str(model.placement.dtype).replace("torch.", "")
    print(f"{model.family} model ({model.parameterization}-prediction) on {model.placement.device} in {dtype}")
    writer = _Writer(command, args, plan, model, height, width)
    generators = pipeline.make_generators(args.seed, args.n_samples, args.seed_mode)
    (_run_txt2img if command == "txt2img" else _run_img2img)(model, args, plan, writer, generators)
    writer.finish(args.n_rows if args.n_rows > 0 else args.n_samples)
    if writer.samples:
        print(f"saved {len(writer.samples)} sample(s): {writer.samples[0]} .. {writer.samples[-1].name}")
    if writer.grid:
        print(f"saved the grid: {writer.grid}")
    print(f"Your samples are ready and waiting for you here: \n{args.outdir} \n \nEnjoy.")
    return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(command: str, argv=None, prog: Optional[str] = None) -> int:
    """Run `command` ("txt2img" or "img2img") with command-line `argv` (default sys.argv[1:]); the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(command, prog).parse_args(argv)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        return run(command, args)
    except (ValueError, OSError, *USER_ERRORS) as e:  # ValueError: settings the pipeline or a sampler refuses
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
