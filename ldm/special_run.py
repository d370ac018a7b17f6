"""The inpaint, depth2img and upscale commands: flags and checks in ldm/special_options.py, loading in
ldm/runtime.py, sampling in ldm/inpainting.py, ldm/depth.py and ldm/upscaling.py, files as txt2img's
(ldm/outputs.py: numbered samples, a grid, the A1111 `parameters` and `ldm` JSON in every PNG).

`tools/inpaint.py`, `tools/depth2img.py`, `tools/upscale.py` and `python -m ldm inpaint|depth2img|upscale`
run `main` here. Seeding is the scripts' (see each pipeline module): one torch generator for the run, and for
inpaint and upscale one numpy RandomState whose successive draws are the batches' start codes. depth2img
also writes the depth it used, scaled to its range as the script shows it (`depth-NNNN.png`).
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import torch

from samplers import drain

from . import pipeline
from .depth import depth_display, depth_t_enc, depth2img_steps, estimate_depth
from .errors import run_command
from .generate import _first, _label, _progress
from .images import save_png, to_uint8
from .inpainting import inpaint_steps
from .loading import LatentDiffusion
from .prompt_file import PromptLine
from .outputs import SampleWriter
from .runtime import load_for_run
from .special_options import SpecialPlan, build_parser, checker, validate
from .upscaling import upscale_steps


def _records(args, plan: SpecialPlan, model: LatentDiffusion) -> tuple[dict, dict]:
    """What the command adds to the PNGs' `ldm` JSON and to their A1111 `parameters` line."""
    h, w = plan.init.image.shape[-2:]
    if plan.command == "inpaint":
        mask = "alpha of the init image" if args.mask_from_alpha else str(args.mask)
        return ({"mask": mask, "mask_sha256": plan.mask.sha256, "mask_from_alpha": args.mask_from_alpha},
                {"Denoising strength": 1.0, "Mask blur": 0})
    if plan.command == "depth2img":
        depth = {"depth_map": str(args.depth_map), "depth_map_sha256": plan.depth.sha256} if plan.depth else \
                {"depth_map": None, "depth_model": "the checkpoint's MiDaS DPT-Hybrid"}
        return ({"strength": args.strength, "t_enc": depth_t_enc(args.strength, args.ddim_steps), **depth},
                {"Denoising strength": args.strength})
    return ({"noise_level": args.noise_level, "low_res_W": w, "low_res_H": h}, {"Noise level": args.noise_level})


class Sampling:
    """The batches of one run: `steps(prompts)` is the next batch's step generator, drawing from the run's
    generators (torch, and numpy for the start codes of inpaint and upscale) in the scripts' order."""

    def __init__(self, model: LatentDiffusion, args, plan: SpecialPlan):
        self.model, self.args, self.plan = model, args, plan
        self.generators = pipeline.make_generators(args.seed, args.n_samples, args.seed_mode)
        self.codes = pipeline.NumpyStartCodes(args.seed, args.n_samples, args.seed_mode)
        self.image = plan.init.image
        self.own = {}
        self.depth = None
        if plan.command == "depth2img":
            self.depth = plan.depth.tensor if plan.depth is not None else estimate_depth(model, self.image)

    def steps(self, prompts: list[str], batch: Optional[int] = None):
        """The step generator of the next batch; `batch`: its index in the plan, for an A1111 --from-file
        line's own negative prompt and seed (a seed gets its own torch and numpy generators, made once)."""
        args, model, k = self.args, self.model, len(prompts)
        line = self.plan.line(batch) if batch is not None else PromptLine()
        generators, codes = self.generators, self.codes
        if line.seed is not None:
            if batch not in self.own:
                self.own[batch] = (pipeline.make_generators(line.seed, args.n_samples, args.seed_mode),
                                   pipeline.NumpyStartCodes(line.seed, args.n_samples, args.seed_mode))
            generators, codes = self.own[batch]
        negative = args.negative_prompt if line.negative_prompt is None else line.negative_prompt
        common = dict(negative_prompt=negative, n_samples=k, steps=args.ddim_steps,
                      sampler=self.plan.spec.name, schedule=self.plan.spec.schedule, scale=args.scale,
                      eta=args.ddim_eta, generator=_first(generators, k), prompt_syntax=args.prompt_syntax)
        h, w = self.image.shape[-2:]
        if self.plan.command == "inpaint":
            f = model.config.vae.downsampling_factor
            x_T = codes.draw((k, model.config.vae.embed_dim, h // f, w // f))
            return inpaint_steps(model, self.image, self.plan.mask.tensor, prompts, x_T=x_T, **common), x_T
        if self.plan.command == "depth2img":
            return depth2img_steps(model, self.image, prompts, depth=self.depth, strength=args.strength,
                                   **common), None
        x_T = codes.draw((k, model.config.vae.embed_dim, h, w))
        return upscale_steps(model, self.image, prompts, noise_level=args.noise_level, x_T=x_T, **common), x_T


def _save_depth(depth: torch.Tensor, args, plan: SpecialPlan) -> None:
    gray = depth_display(depth)
    settings = {"command": "depth2img", "what": "the depth used, scaled to its range (larger = nearer)",
                "depth_map": str(args.depth_map) if plan.depth else None, "seed": args.seed}
    path = save_png(np.repeat(gray[..., None], 3, axis=2), args.outdir, parameters="depth", settings=settings,
                    prefix="depth-", digits=4)
    print(f"saved the depth: {path}")


def run(command: str, args) -> int:
    """Validate, load, sample, save; the exit code. Raises UsageError (and the loaders' errors)."""
    plan = validate(command, args)
    for note in (plan.init.note, plan.mask.note if plan.mask else None):
        if note:
            print(f"note: {note}")
    print(f"Loading model from {plan.ckpt}")
    model = load_for_run(args, plan, check=checker(plan))
    for note in model.notes:
        print(f"note: {note}")
    dtype = str(model.placement.dtype).replace("torch.", "")
    print(f"{model.family} model ({model.parameterization}-prediction) on {model.placement.device} in {dtype}")
    settings, infotext = _records(args, plan, model)
    writer = SampleWriter(command, args, plan, model, settings=settings, infotext=infotext)
    sampling = Sampling(model, args, plan)
    if sampling.depth is not None and not args.skip_save:
        _save_depth(sampling.depth, args, plan)
    for n in range(args.n_iter):
        for b, prompts in enumerate(plan.batches):
            steps, x_T = sampling.steps(prompts, b)
            latents = drain(_progress(steps, _label(n, b, args, plan)), x_T)
            writer.add(to_uint8(pipeline.decode(model, latents)), n, b, prompts)
    writer.finish(args.n_rows if args.n_rows > 0 else args.n_samples)
    writer.report()
    return 0


def main(command: str, argv=None, prog: Optional[str] = None) -> int:
    """Run `command` ("inpaint", "depth2img" or "upscale") with command-line `argv`; the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(lambda: run(command, build_parser(command, prog).parse_args(argv)))
