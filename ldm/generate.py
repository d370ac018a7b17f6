"""The txt2img and img2img commands: flags and checks in ldm/options.py, loading in ldm/runtime.py,
the files they write in ldm/outputs.py.

`tools/txt2img.py`, `tools/img2img.py` and `python -m ldm txt2img|img2img` all run `main` here.
Images are seeded as `ldm.pipeline` documents, from one CPU generator:
    txt2img: x_T per batch (once before the loop with --fixed_code), then the sampler's noise;
    img2img: the init image's posterior sample once, then per batch the stochastic-encode noise
             and the sampler's noise.
Every PNG carries the A1111 `parameters` text and an `ldm` JSON with all that is needed to make it
again; both are deterministic, so the same command gives the same bytes.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from tqdm import tqdm

from samplers import drain
from samplers.noise import randn

from . import pipeline
from .errors import UsageError, run_command
from .images import to_uint8
from .options import RunPlan, build_parser, check_model, validate
from .outputs import SampleWriter
from .runtime import compile_unet, load_for_run

# compile_unet: tools/bench.py times the UNet as --compile runs it, through this name
__all__ = ["main", "run", "build_parser", "validate", "check_model", "UsageError", "compile_unet"]


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


def _label(n: int, b: int, args, plan: RunPlan) -> str:
    batches = len(plan.batches)
    parts = [f"iteration {n + 1}/{args.n_iter}"] + ([f"batch {b + 1}/{batches}"] if batches > 1 else [])
    return "Sampling (" + ", ".join(parts) + ")"


def _first(generators, k: int):
    """The batch's one generator, or (per-sample mode) the first k of its generators."""
    return generators if isinstance(generators, torch.Generator) else generators[:k]


def seeded(args, plan: RunPlan, generators, make=pipeline.make_generators):
    """batch -> (key, generators): the run's (key None), or those of an A1111 --from-file line's own --seed
    (key: the batch), made once, so that each iteration continues them as it continues the run's."""
    own = {}

    def of(b: int):
        seed = plan.line(b).seed
        if seed is None:
            return None, generators
        if b not in own:
            own[b] = make(seed, args.n_samples, args.seed_mode)
        return b, own[b]
    return of


def negative_of(args, plan: RunPlan, b: int) -> str:
    line = plan.line(b)
    return args.negative_prompt if line.negative_prompt is None else line.negative_prompt


def _run_txt2img(model, args, plan: RunPlan, writer: SampleWriter, generators) -> None:
    h, w = plan.height, plan.width
    of, fixed = seeded(args, plan, generators), {}
    for n in range(args.n_iter):
        for b, prompts in enumerate(plan.batches):
            key, run_generators = of(b)
            if args.fixed_code and key not in fixed:  # drawn before the key's first batch, as the original
                fixed[key] = randn(pipeline.latent_shape(model, args.n_samples, h, w), run_generators)
            k, generator = len(prompts), _first(run_generators, len(prompts))
            x_T = fixed[key][:k] if args.fixed_code else randn(pipeline.latent_shape(model, k, h, w), generator)
            steps = pipeline.txt2img_steps(model, prompts, negative_prompt=negative_of(args, plan, b), n_samples=k,
                                           height=h, width=w, steps=args.ddim_steps, sampler=plan.spec.name,
                                           schedule=plan.spec.schedule, scale=args.scale, eta=args.ddim_eta,
                                           generator=generator, x_T=x_T, prompt_syntax=args.prompt_syntax)
            latents = drain(_progress(steps, _label(n, b, args, plan)), x_T)
            writer.add(to_uint8(pipeline.decode(model, latents)), n, b, prompts)


def _run_img2img(model, args, plan: RunPlan, writer: SampleWriter, generators) -> None:
    init = plan.init.image.repeat(args.n_samples, 1, 1, 1)
    of, init_latents = seeded(args, plan, generators), {}
    print(f"target t_enc is {pipeline.strength_to_steps(args.strength, args.ddim_steps)} steps")
    for n in range(args.n_iter):
        for b, prompts in enumerate(plan.batches):
            key, run_generators = of(b)
            if key not in init_latents:  # the posterior sample, drawn first from its generators
                init_latents[key] = pipeline.encode_image(model, init, run_generators)
            x0, generator = init_latents[key][:len(prompts)], _first(run_generators, len(prompts))
            steps = pipeline.img2img_steps(model, x0, prompts, strength=args.strength,
                                           negative_prompt=negative_of(args, plan, b), steps=args.ddim_steps,
                                           sampler=plan.spec.name, schedule=plan.spec.schedule,
                                           scale=args.scale, eta=args.ddim_eta, generator=generator,
                                           prompt_syntax=args.prompt_syntax)
            latents = drain(_progress(steps, _label(n, b, args, plan)), x0)
            writer.add(to_uint8(pipeline.decode(model, latents)), n, b, prompts)


def run(command: str, args) -> int:
    """Validate, load, sample, save; the exit code. Raises UsageError (and the loaders' errors)."""
    plan = validate(command, args)
    if plan.init is not None:
        print(plan.init.note or f"loaded input image of size {plan.width}x{plan.height} from {args.init_img}")
    print(f"Loading model from {plan.ckpt}")
    model = load_for_run(args, plan)
    for note in model.notes:
        print(f"note: {note}")
    dtype = str(model.placement.dtype).replace("torch.", "")
    print(f"{model.family} model ({model.parameterization}-prediction) on {model.placement.device} in {dtype}")
    writer = SampleWriter(command, args, plan, model)
    generators = pipeline.make_generators(args.seed, args.n_samples, args.seed_mode)
    (_run_txt2img if command == "txt2img" else _run_img2img)(model, args, plan, writer, generators)
    writer.finish(args.n_rows if args.n_rows > 0 else args.n_samples)
    writer.report()
    return 0


def main(command: str, argv=None, prog: Optional[str] = None) -> int:
    """Run `command` ("txt2img" or "img2img") with command-line `argv` (default sys.argv[1:]); the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(lambda: run(command, build_parser(command, prog).parse_args(argv)))
