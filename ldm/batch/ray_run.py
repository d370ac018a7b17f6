"""--ray: the same rendering (ldm/batch/render.py) in a pool of Ray actors, fed by a Ray Data pipeline.

The driver hands the pending jobs to Ray Data; `map_batches` sends them, a few at a time, to a fixed pool
of actors that each hold a Renderer (and so the loaded model); each actor returns its finished jobs'
PNG bytes, which stream back to the driver as they come. The driver, not the workers, writes DIR and
the manifest: a cluster needs no shared filesystem. Ray Data restarts an actor that dies and retries
the batch it held, so its jobs run again elsewhere or in its replacement.

Ray is an optional extra, imported only here and only with --ray.
"""
from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from typing import Optional

from ..errors import UsageError
from .version import code_digest

MISSING = "--ray needs Ray Data: pip install -e '.[ray]' (or run without --ray: one process, no Ray)"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is a separate part of the ray package
    except ImportError:
        raise UsageError(MISSING) from None
    return ray


class Worker:
    """One actor of the pool: a Renderer that keeps its models between batches."""

    def __init__(self, batch_size: int, threads: int, driver_code: str):
        import torch

        from .render import Renderer, worker_name
        from .version import code_digest

        torch.set_num_threads(threads)
        self.renderer = Renderer(batch_size)
        self.skew = None if code_digest() == driver_code else (
            f"worker {worker_name()} runs other ldm code than the driver ({code_digest()}, the driver's "
            f"{driver_code}): install the same version on every node, then rerun with --retry-failed")

    def __call__(self, batch: dict) -> dict:
        jobs = [json.loads(text) for text in batch["job"]]
        if self.skew:
            results = [{"id": job["id"], "error": self.skew, "worker": self.renderer.worker, "seconds": 0.0}
                       for job in jobs]
        else:
            results = list(self.renderer.render(jobs))
        return {"id": [r["id"] for r in results], "result": [pickle.dumps(r) for r in results]}


def resources(total_cpus: float, workers: int, cpus_per_worker: Optional[float],
              threads: Optional[int]) -> tuple[float, int]:
    """(logical CPUs each actor asks Ray for, torch threads each actor runs).

    The logical CPUs leave one CPU of the cluster free: Ray Data's own tasks (reading, splitting blocks)
    need one too, and with every CPU held by actors they are never scheduled and the pipeline never
    starts (two actors of one CPU each on a 2-core machine). The threads default to one, as in local
    mode: on the CPU the thread count changes how reductions round, so the same count everywhere keeps
    the images the same at any number of workers (--threads N: pass the same N to every run)."""
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    if cpus_per_worker is None:
        cpus_per_worker = round(max(0.1, (total_cpus - 1) / workers), 2)
    elif cpus_per_worker <= 0:
        raise UsageError(f"--cpus-per-worker {cpus_per_worker}: must be more than 0")
    return cpus_per_worker, threads or 1


def run_ray(jobs: list[dict], *, address: Optional[str], workers: int, gpus_per_worker: float,
            cpus_per_worker: Optional[float], batch_size: int, threads: Optional[int],
            object_store_mb: int) -> Iterator[dict]:
    """Each job's result as it comes back (as Renderer.render yields them)."""
    ray = _import_ray()
    started = not ray.is_initialized()  # else a session the caller opened (a notebook, a test) is used and kept
    if started:
        options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        if address is None:  # a local instance: a small object store (the results are only PNG bytes)
            options["object_store_memory"] = object_store_mb * 2 ** 20
        ray.init(address=address, **options)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the batch has its own bar over the jobs
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        cpus, threads = resources(ray.cluster_resources().get("CPU", 1.0), workers, cpus_per_worker, threads)
        rows = ray.data.from_items([{"id": job["id"], "job": json.dumps(job)} for job in jobs])
        results = rows.map_batches(Worker, fn_constructor_args=(batch_size, threads, code_digest()),
                                   batch_size=batch_size,
                                   compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
                                   num_gpus=gpus_per_worker or None, batch_format="numpy")
        for row in results.iter_rows():
            yield pickle.loads(row["result"])
    finally:
        if started:
            ray.shutdown()
