"""One run of a command from the page: the settings become that command's own argv, parsed by its own parser
and checked by its own `validate`; the batches are sampled as ldm/generate.py and ldm/special_run.py sample
them and written by the same SampleWriter, so a page run and `python -m ldm <command> <argv>` write the same
bytes. What the UI adds: the model stays loaded between runs, and `Runner.run` is a generator that yields a
`Progress` every step (with the linear latent preview every few), and stops at the next step after `cancel()`.
"""
from __future__ import annotations

import hashlib
import random
import shlex
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from samplers.noise import randn
from samplers.registry import available, resolve_sampler

from .. import pipeline
from ..images import to_uint8
from ..outputs import SampleWriter
from ..preview import LatentRGB, fit_latent_rgb
from ..runtime import check_fits, load_for_run

SPECIAL = ("inpaint", "depth2img", "upscale")
# form field -> the command's flag (the API's parameter names are the form's)
FLAGS = {"prompt": "--prompt", "negative_prompt": "--negative-prompt", "steps": "--ddim_steps",
         "sampler": "--sampler", "scale": "--scale", "seed": "--seed", "width": "--W", "height": "--H",
         "n_samples": "--n_samples", "n_iter": "--n_iter", "strength": "--strength", "noise_level": "--noise_level",
         "init_image": "--init-img", "mask": "--mask", "depth_map": "--depth-map", "prompt_syntax": "--prompt-syntax"}
# The page reads prompts as AUTOMATIC1111 does ((word:1.2), [from:to:when], BREAK): what its users paste.
PROMPT_SYNTAX = "a1111"
SAMPLERS = [resolve_sampler(n).a1111_name for n in available()]  # the page's choices, by A1111 name
SAMPLERS += [f"{s} Karras" for s in SAMPLERS if resolve_sampler(s).space == "sigma"]
MAX_IMAGES = 16  # per run (n_samples * n_iter): the page's bound on a batch


class Cancelled(Exception):
    """Cancel was pressed: the run stopped at a step boundary; samples of finished batches stay saved."""


@dataclass
class Progress:
    index: int                      # 0-based step of the current batch
    total: int
    label: str                      # "batch 1/2"
    preview: Optional[np.ndarray]   # (H, W, 3) uint8 of sample 0's predicted x0, on preview steps only


@dataclass
class Result:
    command_line: str
    samples: list[Path] = field(default_factory=list)
    grid: Optional[Path] = None
    depth: Optional[Path] = None
    notes: list[str] = field(default_factory=list)


def stash_input(path: str | Path, outdir: Path) -> Path:
    """An uploaded file copied into the output folder as inputs/<sha256[:16]><ext>, so the PNGs' settings
    name a file that stays, and the command line shown runs as it is."""
    data = Path(path).read_bytes()
    target = Path(outdir) / "inputs" / (hashlib.sha256(data).hexdigest()[:16] + (Path(path).suffix or ".png"))
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return target


def argv_for(command: str, ckpt: str, outdir: Path, device: str = "auto", **form) -> list[str]:
    """The command's argv for the form's values (None: the command's default). seed -1: a random one."""
    if form.get("seed") is not None and int(form["seed"]) < 0:
        form["seed"] = random.randrange(2 ** 32)
    if form.get("prompt_syntax") is None:
        form["prompt_syntax"] = PROMPT_SYNTAX
    argv = ["--ckpt", str(ckpt), "--outdir", str(Path(outdir) / f"{command}-samples"), "--device", device]
    for name, value in form.items():
        if value is None:
            continue
        if name not in FLAGS:
            raise TypeError(f"unknown setting {name!r}")
        if isinstance(value, float) and value.is_integer() and name in ("steps", "seed", "width", "height",
                                                                        "n_samples", "n_iter", "noise_level"):
            value = int(value)
        argv += [FLAGS[name], str(value)]
    n = int(form.get("n_samples") or 1) * int(form.get("n_iter") or 1)
    if n > MAX_IMAGES:
        from ..errors import UsageError
        raise UsageError(f"{n} images in one run: the UI makes at most {MAX_IMAGES} (n_samples x n_iter); "
                         "use the command line for more")
    return argv + (["--skip_grid"] if n == 1 else [])


def command_line(command: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", "ldm", command, *argv])


def parse(command: str, argv: list[str]):
    """(args, plan, check): the command's parser, validate and model check; no weights read."""
    if command in SPECIAL:
        from ..special_options import build_parser, checker, validate

        args = build_parser(command).parse_args(argv)
        plan = validate(command, args)
        return args, plan, checker(plan)
    from ..options import build_parser, check_model, validate

    args = build_parser(command).parse_args(argv)
    return args, validate(command, args), check_model


class Runner:
    """The loaded model (one at a time), its latent preview, and the Cancel flag. The page runs one
    generation at a time (its queue), so the flag is the run's."""

    def __init__(self):
        self._model = None          # (key, model)
        self._fits: dict[str, LatentRGB] = {}
        self._cancel = threading.Event()
        self._done = 0              # steps finished in the running batch
        self._pressed_after = 0     # ... when Cancel came (the message names both: "within one step" shows)
        self.lock = threading.Lock()

    def cancel(self) -> None:
        self._pressed_after = self._done
        self._cancel.set()

    def begin(self) -> None:
        """A new run: a Cancel pressed before it does not stop it."""
        self._cancel.clear()
        self._done = 0

    def check_cancel(self, index: int, total: int, where: str = "", saved: str = "") -> None:
        """Raise Cancelled when Cancel was pressed; called with each step's 0-based index before it is used."""
        if self._cancel.is_set():
            raise Cancelled(f"cancelled at step {index + 1} of {total}{where} (Cancel came after step "
                            f"{self._pressed_after}){saved}")
        self._done = index + 1

    def current(self):
        """The loaded model (the Steps tab decodes with the one its run used)."""
        if self._model is None:
            raise RuntimeError("no model loaded yet")
        return self._model[1]

    def model(self, args, plan, check):
        key = (str(plan.ckpt), args.config, str(plan.placement.device), str(plan.placement.dtype))
        if self._model is not None and self._model[0] == key:
            model = self._model[1]
            check(model, args)
            check_fits(model, plan)
            return model
        self._model = None  # one model in memory at a time
        model = load_for_run(args, plan, check=check)
        self._model = (key, model)
        return model

    def preview(self, model, ckpt: str, latents: torch.Tensor) -> np.ndarray:
        """Sample 0's latent through the linear preview (fitted on a VAE decode the first time)."""
        z = latents[:1].float().cpu()
        fit = self._fits.get(ckpt)
        if fit is None:
            fit = self._fits[ckpt] = fit_latent_rgb(z, pipeline.decode(model, z))
        f = model.config.vae.downsampling_factor
        return to_uint8(fit(z, scale=f))[0]

    def run(self, command: str, argv: list[str], every: int = 5) -> Iterator[Progress]:
        """Validate, load (or reuse), sample and save, as the command does; yields a Progress every step and
        returns (as StopIteration.value, `yield from`'s value) the Result."""
        self.begin()
        args, plan, check = parse(command, argv)
        model = self.model(args, plan, check)
        result = Result(command_line(command, argv), notes=list(model.notes))
        mask = getattr(plan, "mask", None)
        result.notes += [n for n in (plan.init.note if plan.init else None, mask.note if mask else None) if n]
        writer, batch_steps = _set_up(command, args, plan, model, result)
        batches = [(n, b, prompts) for n in range(args.n_iter) for b, prompts in enumerate(plan.batches)]
        for k, (n, b, prompts) in enumerate(batches):
            steps, x = batch_steps(prompts)
            self._done = 0
            for step in steps:
                self.check_cancel(step.index, step.total, f" of batch {k + 1}",
                                  f"; {len(writer.samples)} image(s) of earlier batches saved" if k else "")
                show = every > 0 and (step.index % every == every - 1 or step.index == step.total - 1)
                preview = self.preview(model, str(plan.ckpt), step.pred_x0) if show else None
                yield Progress(step.index, step.total, f"batch {k + 1}/{len(batches)}", preview)
                x = step.x_next
            images = pipeline.decode(model, x)
            self._fits[str(plan.ckpt)] = fit_latent_rgb(x.float().cpu(), images)  # the next previews' map
            writer.add(to_uint8(images), n, b, prompts)
        writer.finish(args.n_rows if args.n_rows > 0 else args.n_samples)
        result.samples, result.grid = list(writer.samples), writer.grid
        return result


def _set_up(command: str, args, plan, model, result: Result):
    """(SampleWriter, prompts -> (step generator, start latent)) drawing from the run's generators in the
    command's order: ldm/generate.py's loops for txt2img/img2img, special_run.Sampling for the others."""
    if command in SPECIAL:
        from ..special_run import Sampling, _records, _save_depth

        settings, infotext = _records(args, plan, model)
        writer = SampleWriter(command, args, plan, model, settings=settings, infotext=infotext)
        sampling = Sampling(model, args, plan)
        if sampling.depth is not None and not args.skip_save:
            before = set(Path(args.outdir).glob("depth-*.png"))
            _save_depth(sampling.depth, args, plan)
            result.depth = next(iter(set(Path(args.outdir).glob("depth-*.png")) - before), None)
        return writer, sampling.steps
    from ..generate import _first

    writer = SampleWriter(command, args, plan, model)
    generators = pipeline.make_generators(args.seed, args.n_samples, args.seed_mode)
    common = dict(negative_prompt=args.negative_prompt, steps=args.ddim_steps, sampler=plan.spec.name,
                  schedule=plan.spec.schedule, scale=args.scale, eta=args.ddim_eta, prompt_syntax=args.prompt_syntax)
    if command == "txt2img":
        h, w = plan.height, plan.width
        shape = lambda k: pipeline.latent_shape(model, k, h, w)  # noqa: E731
        fixed = randn(shape(args.n_samples), generators) if args.fixed_code else None

        def txt2img(prompts):
            k, generator = len(prompts), _first(generators, len(prompts))
            x_T = fixed[:k] if fixed is not None else randn(shape(k), generator)
            return pipeline.txt2img_steps(model, prompts, n_samples=k, height=h, width=w, generator=generator,
                                          x_T=x_T, **common), x_T
        return writer, txt2img
    init_latent = pipeline.encode_image(model, plan.init.image.repeat(args.n_samples, 1, 1, 1), generators)

    def img2img(prompts):
        x0, generator = init_latent[:len(prompts)], _first(generators, len(prompts))
        return pipeline.img2img_steps(model, x0, prompts, strength=args.strength, generator=generator,
                                      **common), x0
    return writer, img2img
