"""A jobs file (JSONL): one JSON object a line, whose keys are the txt2img/img2img flag names plus `id`.

Reading the file checks only what identifies a job (valid JSON, a unique, file-name-safe `id`): a file
that fails that is one error for the whole run. Everything else about a job (an unknown key, a bad
value, a missing checkpoint) fails that job alone, where it is parsed or run, and the others go on.
"""
from __future__ import annotations

import json
import os
import re
from argparse import Namespace
from pathlib import Path

from ..errors import UsageError
from ..options import build_parser

ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PATH_KEYS = ("ckpt", "config", "vae", "init_img")
# Flags that make no sense for one job of a batch: the batch decides them.
REFUSED = {
    "outdir": "outdir is the batch's (--outdir DIR); each job's images go to DIR/<id>/",
    "from_file": "from_file: a job has one prompt; write one job per prompt",
    "repeat": "repeat: a job has one prompt; write one job per prompt (or raise n_samples)",
    "skip_grid": "skip_grid: a batch writes no grids",
    "skip_save": "skip_save: a batch job that saves nothing does nothing; drop it",
    "n_rows": "n_rows: a batch writes no grids; drop it",
    "fixed_code": "fixed_code: image i of a job starts from the noise of seed + i; drop it",
}
FIXED = {"n_iter": (1, "n_iter: a batch job runs once; ask for more images with n_samples (image i is seeded seed + i)"),
         "seed_mode": ("per-sample", "seed_mode: a batch seeds image i of a job with seed + i (per-sample); drop it")}


def read_jobs(path) -> list[dict]:
    """The jobs of a JSONL file, in order, with `id` as a string and relative paths made absolute (the
    workers of a Ray cluster need not share the driver's working folder)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; pass a JSONL file of jobs (or make one with --grid)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__})") from None
    jobs, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {n}: not JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(job, dict):
            raise UsageError(f"{path} line {n}: a job is a JSON object ({{\"id\": ..., \"prompt\": ...}})")
        job_id = job.get("id")
        if isinstance(job_id, int) and not isinstance(job_id, bool):
            job_id = str(job_id)
        if not isinstance(job_id, str) or not ID.fullmatch(job_id):
            raise UsageError(f"{path} line {n}: each job needs an \"id\" of letters, digits, '.', '_' or '-' "
                             "(it names the job's folder)")
        if job_id in seen:
            raise UsageError(f"{path} line {n}: id {job_id!r} is used twice; ids must be unique")
        seen.add(job_id)
        jobs.append({**job, "id": job_id, **_absolute_paths(job)})
    if not jobs:
        raise UsageError(f"{path}: has no jobs; write one JSON object per line")
    return jobs


def _absolute_paths(job: dict) -> dict:
    return {k: os.path.abspath(job[k]) for k in PATH_KEYS
            if isinstance(job.get(k), str) and not (k == "ckpt" and job[k] == "builtin")}


def command_of(job: dict) -> str:
    return "img2img" if job.get("init_img") is not None else "txt2img"


def parse_job(job: dict) -> tuple[str, Namespace]:
    """(command, the command's parsed flags) for one job: its keys go through the command's own parser, so
    types, choices and messages are the command's. UsageError for a key or value it refuses."""
    command = command_of(job)
    parser = build_parser(command)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    argv = []
    for key, value in job.items():
        if key == "id" or value is None:
            continue
        if key in REFUSED:
            raise UsageError(REFUSED[key])
        if key in FIXED:
            if value != FIXED[key][0]:
                raise UsageError(FIXED[key][1])
            continue
        action = actions.get(key)
        if action is None:
            raise UsageError(f"unknown key {key!r}; a job's keys are the {command} flag names (prompt, seed, "
                             "sampler, ddim_steps, scale, H, W, n_samples, ckpt, ...) and id")
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch: true sets it, false leaves it out
            if not isinstance(value, bool):
                raise UsageError(f"{key}: {value!r} is not true or false")
            argv += [flag] if value else []
        else:
            argv.append(f"{flag}={value}")  # one token, so a prompt that starts with '-' stays a value
    if "n_samples" not in job:
        argv.append("--n_samples=1")  # one image a job unless it asks for more (the commands default to 2-3)
    args = parser.parse_args(argv)
    args.n_iter, args.seed_mode, args.skip_grid = 1, "per-sample", True
    return command, args
