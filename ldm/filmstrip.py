"""`python -m ldm steps`: watch an image form. txt2img's flags plus `--every K`; `python -m ldm steps inpaint
...` (or depth2img, upscale) takes that command's flags instead.

Writes, for the first batch of the first iteration:
- `steps-NNNN.png`, a filmstrip: for each sample, a row of the predicted x0 every K steps decoded by the
  VAE, and under it the same latents through the cheap linear latent->RGB preview (ldm/preview.py,
  fitted on these very decodes: its RMS error is printed and stored in the PNG);
- `steps-NNNN.gif`, the decoded predictions of sample 0 as an animation.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from . import pipeline
from .errors import UsageError, run_command
from .images import make_grid, save_gif, save_png, to_uint8
from .options import build_parser, validate
from .preview import fit_latent_rgb
from .runtime import load_for_run


def filmstrip_latents(steps, every: int):
    """(step indices, pred_x0 latents (S, B, C, h, w)) for every `every`-th step and the last one."""
    kept, latents = [], []
    for step in steps:
        if step.index % every == 0 or step.index == step.total - 1:
            kept.append(step.index)
            latents.append(step.pred_x0.float().cpu())
    return kept, torch.stack(latents)


def _first_batch(command: str, args):
    """(model, plan, the first batch's prompts, its step generator) for `command`."""
    if command != "txt2img":
        from .special_options import checker
        from .special_options import validate as validate_special
        from .special_run import Sampling

        plan = validate_special(command, args)
        model = load_for_run(args, plan, check=checker(plan))
        steps, _ = Sampling(model, args, plan).steps(plan.batches[0])
        return model, plan, plan.batches[0], steps
    plan = validate("txt2img", args)
    model = load_for_run(args, plan)
    prompts = plan.batches[0]
    generator = pipeline.make_generators(args.seed, len(prompts), args.seed_mode)
    steps = pipeline.txt2img_steps(model, prompts, negative_prompt=args.negative_prompt, n_samples=len(prompts),
                                   height=plan.height, width=plan.width, steps=args.ddim_steps,
                                   sampler=plan.spec.name, schedule=plan.spec.schedule, scale=args.scale,
                                   eta=args.ddim_eta, generator=generator, prompt_syntax=args.prompt_syntax)
    return model, plan, prompts, steps


def run(args, command: str = "txt2img") -> int:
    if args.every < 1:
        raise UsageError(f"--every {args.every}: must be at least 1")
    model, plan, prompts, steps = _first_batch(command, args)
    for note in model.notes:
        print(f"note: {note}")
    kept, latents = filmstrip_latents(steps, args.every)
    s, b = latents.shape[:2]
    flat = latents.flatten(0, 1)  # (S*B, C, h, w), step-major
    decoded = torch.cat([pipeline.decode(model, z[None]) for z in flat])
    fit = fit_latent_rgb(flat, decoded)
    previews = fit(flat, scale=decoded.shape[-1] // flat.shape[-1])
    decoded_u8 = to_uint8(decoded).reshape(s, b, *decoded.shape[2:], 3)
    preview_u8 = to_uint8(previews).reshape(s, b, *decoded.shape[2:], 3)
    rows = [row for i in range(b) for row in (decoded_u8[:, i], preview_u8[:, i])]
    strip = make_grid(np.concatenate(rows), n_rows=s)
    settings = {"command": "steps", "of": command, "prompt": prompts[0], "negative_prompt": args.negative_prompt,
                "seed": args.seed, "seed_mode": args.seed_mode, "sampler": plan.spec.name,
                "schedule": plan.spec.schedule, "steps": args.ddim_steps, "scale": args.scale,
                "eta": args.ddim_eta, "H": plan.height, "W": plan.width, "f": model.config.vae.downsampling_factor,
                "every": args.every, "shown_steps": kept,
                "ckpt": str(args.ckpt), "preview_fit_rms": fit.rms,
                "preview_weight": fit.weight.tolist(), "preview_bias": fit.bias.tolist()}
    png = save_png(strip, args.outdir, parameters=f"{prompts[0]}\nSteps: {args.ddim_steps}, Seed: {args.seed}",
                   settings=settings, prefix="steps-", digits=4)
    gif = save_gif(list(decoded_u8[:, 0]), args.outdir, prefix="steps-")
    print(f"steps shown: {kept}")
    print(f"linear preview fitted on these {len(flat)} decodes: RMS error {fit.rms:.3f} (images in [-1, 1])")
    print(f"wrote {png} and {gif}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from .special_options import COMMANDS as SPECIAL

    command = argv.pop(0) if argv and argv[0] in SPECIAL else "txt2img"
    if command == "txt2img":
        parser = build_parser("txt2img", prog="python -m ldm steps")
    else:
        from .special_options import build_parser as build_special

        parser = build_special(command, prog=f"python -m ldm steps {command}")
    parser.add_argument("--every", type=int, default=1, help="show every K-th step (and the last)")
    parser.set_defaults(outdir="outputs/steps", n_samples=1, n_iter=1)
    return run_command(lambda: run(parser.parse_args(argv), command))
