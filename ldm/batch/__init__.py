"""`python -m ldm batch JOBS.jsonl --outdir DIR`: many txt2img/img2img jobs, resumable, in one process or
on a Ray cluster (`--ray [ADDRESS]`), with the same PNG bytes either way.

    jobs.py      the jobs file, and one job's keys as the commands' flags
    grid.py      --grid: a cartesian sweep written as a jobs file
    render.py    jobs -> PNG bytes (batched, padded, seeded per image): what every worker runs
    local.py     local mode: one Renderer in this process
    ray_run.py   --ray: Renderers in a Ray Data actor pool
    landing.py   a job's files into DIR/<id>/, all or nothing
    manifest.py  DIR/manifest.jsonl: what is done, for resuming
    driver.py    landing, recording, the progress bar and the summary
"""
from __future__ import annotations

import argparse
import sys
import time
from itertools import chain
from pathlib import Path

from ..errors import UsageError, run_command
from . import landing
from .driver import drive, summary
from .grid import expand, parse_grid, write_jobs
from .jobs import parse_job, read_jobs
from .manifest import NAME, Manifest

LOCAL = "local"  # --ray without an address


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see python -m ldm batch --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ldm batch", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="A job: {\"id\": \"cat-1\", \"prompt\": \"a cat\", \"seed\": 1, \"ckpt\": \"model.safetensors\", "
                       "...} (keys: the txt2img/img2img flag names; init_img makes it img2img; n_samples "
                       "defaults to 1; image i is seeded seed + i). Files: DIR/<id>/00000.png ..., "
                       f"DIR/{NAME}.")
    a = p.add_argument
    a("jobs", help="the jobs file (JSONL); with --grid, the file to write")
    a("--outdir", help="folder for the images and the manifest; a rerun skips the jobs recorded there")
    a("--grid", help="write a cartesian sweep to JOBS first, e.g. 'prompts=a cat|a dog,seeds=0-3,scale=5|7.5,"
                     "ckpt=model.safetensors' (without --outdir: only write it)")
    a("--batch-size", "--batch_size", dest="batch_size", type=int, default=4,
      help="images per batch; every batch is padded to this size, so an image depends only on its job and "
           "this number (default 4)")
    a("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
      help="run on Ray: a local instance, or the cluster at ADDRESS (auto, HOST:6379, ray://HOST:10001)")
    a("--workers", type=int, default=1, help="actors in the pool, each holding a model (--ray)")
    a("--gpus-per-worker", dest="gpus_per_worker", type=float, default=0.0, help="GPUs each actor asks for (--ray)")
    a("--cpus-per-worker", dest="cpus_per_worker", type=float, default=None,
      help="logical CPUs each actor asks for (--ray; default: the cluster's CPUs less one, shared out)")
    a("--threads", type=int, default=None,
      help="torch threads per worker (default 1: on the CPU the images depend on the thread count, so pass "
           "the same number to every run that should give the same bytes; scale out with --workers)")
    a("--object-store-mb", dest="object_store_mb", type=int, default=256,
      help="object store of a local Ray instance, in MB (default 256)")
    a("--retry-failed", dest="retry_failed", action="store_true", help="run the jobs recorded as failed again")
    return p


def _check(args) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be at least 1")
    if args.ray is None and (args.workers != 1 or args.gpus_per_worker or args.cpus_per_worker is not None):
        raise UsageError("--workers, --gpus-per-worker and --cpus-per-worker are for --ray; add --ray")
    if args.gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker {args.gpus_per_worker}: must be 0 or more")


def _parse_failures(jobs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(jobs whose keys parse, results for those that do not): a job with a bad key fails without a worker."""
    ready, failed = [], []
    for job in jobs:
        try:
            parse_job(job)
            ready.append(job)
        except UsageError as e:
            failed.append({"id": job["id"], "error": str(e), "worker": None, "seconds": 0.0})
    return ready, failed


def run(args) -> int:
    _check(args)
    if args.grid:
        jobs = expand(parse_grid(args.grid))
        wrote = write_jobs(args.jobs, jobs)
        print(f"{'wrote' if wrote else 'kept'} {len(jobs)} job(s) in {args.jobs}")
        if not args.outdir:
            return 0
    if not args.outdir:
        raise UsageError("--outdir DIR is required: the folder for the images and the manifest")
    jobs = read_jobs(args.jobs)
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"{outdir}: is a file; --outdir takes a folder")
    outdir.mkdir(parents=True, exist_ok=True)
    landing.clean(outdir)
    manifest = Manifest(outdir)
    for job in jobs:  # a job landed by a run killed before it could record it: recorded now, not made again
        if job["id"] not in manifest.records and (found := landing.landed(outdir, job["id"])):
            manifest.append({"id": job["id"], "files": found[0], "sha256": found[1], "images": len(found[0]),
                             "seconds": None, "worker": None, "recovered": True})
    finished = manifest.finished(args.retry_failed)
    pending = [job for job in jobs if job["id"] not in finished]
    ready, failed = _parse_failures(pending)
    began = time.perf_counter()
    if not ready:
        rendered = iter(())
    elif args.ray is None:
        from .local import run_local
        rendered = run_local(ready, args.batch_size, args.threads)
    else:
        from .ray_run import run_ray
        rendered = run_ray(ready, address=None if args.ray == LOCAL else args.ray, workers=args.workers,
                           gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                           batch_size=args.batch_size, threads=args.threads, object_store_mb=args.object_store_mb)
    records = drive(chain(failed, rendered), outdir, manifest, len(jobs), len(jobs) - len(pending))
    for line in summary(records, time.perf_counter() - began, len(jobs) - len(pending)):
        print(line)
    print(f"manifest: {manifest.path}")
    errors = sum("error" in manifest.records[job["id"]] for job in jobs if job["id"] in manifest.records)
    if errors:
        print(f"{errors} of {len(jobs)} job(s) failed; their errors are in {manifest.path} "
              "(--retry-failed runs them again)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(lambda: run(build_parser().parse_args(argv)))
