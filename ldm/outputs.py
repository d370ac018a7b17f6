"""What a txt2img or img2img run writes: numbered sample PNGs as they come and the grid at the end, each
carrying the A1111 `parameters` text and an `ldm` JSON with all that is needed to make it again.

Its own module, not ldm/images.py: images.py is the file layer (pixels, PNG chunks, numbering) and
needs no model, and options.py reads init images through it before any weights are loaded; the
writer needs the loaded model, the run plan and the sampler's name, so it sits above both.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .images import a1111_parameters, make_grid, model_hash, save_png
from .loading import LatentDiffusion, find_config
from .options import RunPlan
from .pipeline import strength_to_steps


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_settings(command: str, args, plan: RunPlan, model: LatentDiffusion) -> dict:
    """The settings every PNG of a run shares; C and f are the model's, whether or not the flags said them."""
    config = args.config or find_config(plan.ckpt)
    vae = model.config.vae
    settings = {
        "command": command, "negative_prompt": args.negative_prompt, "seed": args.seed,
        "n_samples": args.n_samples, "n_iter": args.n_iter, "from_file": args.from_file,
        "repeat": args.repeat, "sampler": plan.spec.name, "schedule": plan.spec.schedule,
        "seed_mode": args.seed_mode, "steps": args.ddim_steps, "eta": args.ddim_eta,
        "scale": args.scale, "H": plan.height, "W": plan.width, "C": vae.embed_dim, "f": vae.downsampling_factor,
        "ckpt": str(args.ckpt), "model_hash": model_hash(plan.ckpt), "config": None if config is None else str(config),
        "family": model.family, "device": str(model.placement.device),
        "dtype": str(model.placement.dtype).replace("torch.", ""), "precision": args.precision,
        "prediction": model.parameterization, "ema": args.ema, "vae": args.vae,
        "lowvram": args.lowvram, "attention_slicing": args.attention_slicing, "vae_tiling": args.vae_tiling,
        "compile": args.compile, "prompt_syntax": getattr(args, "prompt_syntax", "original"),
        "watermark": watermark_text(args, model),
        "ldm_version": _version("ldm"), "torch_version": torch.__version__,
    }
    if command == "txt2img":
        settings["fixed_code"] = args.fixed_code
    elif command == "img2img":
        settings.update(strength=args.strength, t_enc=strength_to_steps(args.strength, args.ddim_steps))
    if plan.init is not None:
        settings.update(init_image=str(args.init_img), init_image_sha256=plan.init.sha256)
    return settings


def watermark_text(args, model: LatentDiffusion) -> Optional[str]:
    """The text --watermark writes for this model (None: no watermark)."""
    if not getattr(args, "watermark", False):
        return None
    from .watermark import text_for

    return text_for(model.family)


class SampleWriter:
    """Saves samples as they come and the grid at the end, each with its settings. `settings` and `infotext`:
    what a command adds to the `ldm` JSON and to the A1111 `parameters` line (the special commands).
    With --watermark each sample and the grid are marked as the original scripts mark them (the grid is
    made of the unmarked samples, then marked as a whole)."""

    def __init__(self, command: str, args, plan: RunPlan, model: LatentDiffusion, settings: Optional[dict] = None,
                 infotext: Optional[dict] = None):
        self.args, self.outdir, self.plan = args, Path(args.outdir), plan
        self.base = {**run_settings(command, args, plan, model), **(settings or {})}
        self.mark = lambda image: image
        if self.base["watermark"]:
            from .watermark import Watermarker

            self.mark = Watermarker(self.base["watermark"]).mark
        self.sampler_label = plan.spec.a1111_name  # as A1111's infotext writes it
        self.extra = {"Denoising strength": args.strength} if command == "img2img" else {}
        self.extra.update(infotext or {})
        if args.seed_mode != "original":
            self.extra["Seed mode"] = args.seed_mode
        self.images: list[np.ndarray] = []
        self.samples: list[Path] = []
        self.grid: Optional[Path] = None
        self.first_prompt: Optional[str] = None

    def _parameters(self, prompt: str, b: Optional[dict] = None) -> str:
        b = b or self.base
        return a1111_parameters(prompt, b["negative_prompt"], b["steps"], self.sampler_label, b["scale"], b["seed"],
                                b["W"], b["H"], b["model_hash"], Path(b["ckpt"]).stem, self.extra)

    def add(self, images: np.ndarray, iteration: int, batch: int, prompts: list[str]) -> None:
        if self.first_prompt is None:
            self.first_prompt = prompts[0]
        if not self.args.skip_grid:
            self.images.extend(images)
        if self.args.skip_save:
            return
        line = self.plan.line(batch)  # an A1111 --from-file line's own negative prompt and seed
        base = {**self.base, **{k: v for k, v in (("negative_prompt", line.negative_prompt), ("seed", line.seed))
                                if v is not None}}
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            settings = {**base, "prompt": prompt, "iteration": iteration, "batch": batch,
                        "index_in_batch": i, "batch_size": len(prompts)}
            self.samples.append(save_png(self.mark(image), self.outdir / "samples",
                                         parameters=self._parameters(prompt, base), settings=settings))

    def finish(self, n_rows: int) -> None:
        if self.args.skip_grid or not self.images:
            return
        settings = {**self.base, "prompt": self.first_prompt, "grid": {"images": len(self.images), "n_rows": n_rows}}
        self.grid = save_png(self.mark(make_grid(np.stack(self.images), n_rows)), self.outdir,
                             parameters=self._parameters(self.first_prompt), settings=settings,
                             prefix="grid-", digits=4)

    def report(self) -> None:
        """What was written, and the original scripts' closing lines."""
        if self.samples:
            print(f"saved {len(self.samples)} sample(s): {self.samples[0]} .. {self.samples[-1].name}")
        if self.grid:
            print(f"saved the grid: {self.grid}")
        print(f"Your samples are ready and waiting for you here: \n{self.args.outdir} \n \nEnjoy.")
