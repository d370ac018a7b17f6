"""Jobs -> finished jobs' PNG bytes: what a worker does, in local mode and in each Ray actor alike.

Jobs whose settings agree (same model, sampler, steps, scale, size, ...) are batched together, one row
per image: image i of a job is a row with its own generator seeded seed + i (the pipelines' per-sample
seed mode), so its noise does not depend on its neighbours. Its pixels would still depend on the size
of the batch (on the CPU, a matrix product of another height may round differently: the same image
alone and in a batch of 4 can differ by one level in a pixel), so every batch is padded to exactly
`batch_size` rows: then an image depends only on its job, the batch size and (on the CPU) the torch
thread count, never on which worker or which other jobs it ran with. The PNGs are written by the
commands' own SampleWriter, with those two numbers added to their `ldm` JSON.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import socket
import tempfile
import time
from argparse import Namespace
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from samplers import drain
from samplers.noise import randn

from .. import pipeline
from ..errors import USER_ERRORS, one_line
from ..images import to_uint8
from ..options import RunPlan, check_model, validate
from ..outputs import SampleWriter
from ..runtime import check_fits, load_for_run
from .jobs import parse_job

PER_ROW = {"prompt", "negative_prompt", "seed", "init_img", "n_samples", "outdir"}  # may differ within a batch
LOAD = ("ckpt", "config", "vae", "device", "dtype", "bf16", "precision", "prediction", "ema", "lowvram",
        "attention_slicing", "vae_tiling", "compile")  # what the loaded model depends on


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def message(e: BaseException) -> str:
    """A job's failure on one line: a user's error as the commands print it, anything else with its type."""
    return one_line(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {one_line(e)}"


@dataclasses.dataclass(eq=False)  # hashed by identity: a job is one object
class Job:
    id: str
    command: str
    args: Namespace
    plan: RunPlan

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch."""
        flags = tuple(sorted((k, v) for k, v in vars(self.args).items() if k not in PER_ROW))
        return (self.command, self.plan.spec.name, self.plan.spec.schedule, self.plan.height, self.plan.width, flags)


class Renderer:
    """Holds the loaded models (the last `keep` of them, by their load settings) between calls."""

    def __init__(self, batch_size: int, keep: int = 2):
        self.batch_size, self.keep = batch_size, keep
        self.models: OrderedDict = OrderedDict()
        self.scratch = Path(tempfile.mkdtemp(prefix="ldm-batch-"))
        self.worker = worker_name()

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _failed(self, job_id: str, e: BaseException) -> dict:
        return {"id": job_id, "error": message(e), "worker": self.worker, "seconds": 0.0}

    def _prepare(self, job: dict) -> Job:
        command, args = parse_job(job)
        args.outdir = str(self.scratch / "check")
        with contextlib.redirect_stdout(io.StringIO()):  # the commands' notes: a batch prints its own summary
            plan = validate(command, args)
        return Job(job["id"], command, args, plan)

    def _model(self, job: Job):
        key = tuple(getattr(job.args, k) for k in LOAD)
        if key not in self.models:
            with contextlib.redirect_stdout(io.StringIO()):
                self.models[key] = load_for_run(job.args, job.plan)
            while len(self.models) > self.keep:
                self.models.popitem(last=False)
        self.models.move_to_end(key)
        return self.models[key]

    def render(self, jobs: list[dict]) -> Iterator[dict]:
        """One result per job, as each finishes: {id, files: [(name, bytes)], images, seconds, worker}, or
        {id, error, seconds, worker}."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            try:
                prepared = self._prepare(job)
            except Exception as e:  # noqa: BLE001 - a job that fails is recorded, the others go on
                yield self._failed(job["id"], e)
                continue
            groups.setdefault(prepared.key, []).append(prepared)
        for members in groups.values():
            yield from self._render_group(members)

    def _render_group(self, members: list[Job]) -> Iterator[dict]:
        try:
            model = self._model(members[0])
            check_fits(model, dataclasses.replace(members[0].plan, batches=[[""] * self.batch_size]))
        except Exception as e:  # noqa: BLE001
            yield from (self._failed(m.id, e) for m in members)
            return
        ok = []
        for m in members:
            try:
                check_model(model, m.args)  # a cached model was checked against another job's flags
                ok.append(m)
            except Exception as e:  # noqa: BLE001
                yield self._failed(m.id, e)
        rows = [(m, i) for m in ok for i in range(m.args.n_samples)]
        images: dict[str, list] = {m.id: [] for m in ok}
        seconds: dict[str, float] = {m.id: 0.0 for m in ok}
        failed: set[str] = set()
        for start in range(0, len(rows), self.batch_size):
            chunk = [(m, i) for m, i in rows[start:start + self.batch_size] if m.id not in failed]
            if not chunk:
                continue
            began = time.perf_counter()
            try:
                out = self._sample(model, chunk)
            except Exception as e:  # noqa: BLE001 - every job with an image in this batch fails
                for m in dict.fromkeys(m for m, _ in chunk):
                    failed.add(m.id)
                    yield self._failed(m.id, e)
                continue
            share = (time.perf_counter() - began) / len(chunk)
            for (m, i), image in zip(chunk, out):
                images[m.id].append(image)
                seconds[m.id] += share
            for m in dict.fromkeys(m for m, _ in chunk):
                if len(images[m.id]) == m.args.n_samples:
                    began = time.perf_counter()
                    try:
                        files = self._write(model, m, np.stack(images.pop(m.id)))
                    except Exception as e:  # noqa: BLE001
                        yield self._failed(m.id, e)
                        continue
                    yield {"id": m.id, "files": files, "images": len(files), "worker": self.worker,
                           "seconds": round(seconds[m.id] + time.perf_counter() - began, 4)}

    @torch.no_grad()
    def _sample(self, model, chunk: list[tuple[Job, int]]) -> np.ndarray:
        """The chunk's images as uint8 (H, W, 3), computed in a batch padded to batch_size rows."""
        rows = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # padding: copies of the last row, dropped
        first, plan = rows[0][0].args, rows[0][0].plan
        prompts = [m.args.prompt for m, _ in rows]
        negatives = [m.args.negative_prompt for m, _ in rows]
        generators = [torch.Generator().manual_seed(m.args.seed + i) for m, i in rows]
        common = dict(negative_prompt=negatives, steps=first.ddim_steps, sampler=plan.spec.name,
                      schedule=plan.spec.schedule, scale=first.scale, eta=first.ddim_eta, generator=generators,
                      prompt_syntax=first.prompt_syntax)
        if rows[0][0].command == "txt2img":  # the draws of ldm/generate.py: x_T, then the sampler's noise
            start = randn(pipeline.latent_shape(model, len(rows), plan.height, plan.width), generators)
            steps = pipeline.txt2img_steps(model, prompts, n_samples=len(rows), height=plan.height,
                                           width=plan.width, x_T=start, **common)
        else:  # the init image's posterior sample, then the stochastic encode and the sampler's noise
            start = pipeline.encode_image(model, torch.cat([m.plan.init.image for m, _ in rows]), generators)
            steps = pipeline.img2img_steps(model, start, prompts, strength=first.strength, **common)
        return to_uint8(pipeline.decode(model, drain(steps, start)))[:len(chunk)]

    def _write(self, model, job: Job, images: np.ndarray) -> list[tuple[str, bytes]]:
        """The job's PNGs as the commands write them (SampleWriter: A1111 `parameters` and the `ldm` JSON), plus
        the job's id, the padded batch size and the thread count: with the job's settings they reproduce its pixels."""
        folder = Path(tempfile.mkdtemp(dir=self.scratch))
        try:
            job.args.outdir = str(folder)
            writer = SampleWriter(job.command, job.args, job.plan, model,
                                  settings={"job": job.id, "batch_rows": self.batch_size,
                                            "threads": torch.get_num_threads()})
            writer.add(images, 0, 0, [job.args.prompt] * len(images))
            return [(path.name, path.read_bytes()) for path in writer.samples]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
