"""`--grid`: a cartesian sweep written out as a jobs file.

    prompts=@prompts.txt,seeds=0-9,scale=5|7.5,sampler=ddim|euler_a,ckpt=model.safetensors,H=512,W=512

Comma-separated `key=values`; `|` separates a key's values (a key with one value is the same in every
job); `@FILE` reads one value a line; `seeds=A-B` is the seeds A..B. Keys are the jobs' keys (flag names);
plurals (prompts, seeds, samplers, scales, steps) are taken for their flag. A comma inside a value is
kept unless `key=` follows it. Jobs are numbered in the order of the product, the last key fastest.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

from ..errors import UsageError

PLURALS = {"prompts": "prompt", "seeds": "seed", "samplers": "sampler", "scales": "scale", "steps": "ddim_steps",
           "negative_prompts": "negative_prompt", "ckpts": "ckpt", "strengths": "strength"}


def _value(text: str):
    """A number or true/false/null as JSON reads it; anything else is the text itself."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (int, float, bool)) or value is None else text


def parse_grid(spec: str) -> dict[str, list]:
    """{key: [values]} in the order given."""
    grid: dict[str, list] = {}
    for part in re.split(r",(?=\s*[A-Za-z_]+\s*=)", spec):
        key, eq, text = part.partition("=")
        key = PLURALS.get(key.strip(), key.strip())
        if not eq or not re.fullmatch(r"[A-Za-z_]+", key):
            raise UsageError(f"--grid: {part!r} is not key=values; write e.g. prompts=a cat|a dog,seeds=0-3,scale=7.5")
        if key in grid:
            raise UsageError(f"--grid: {key} is given twice; separate its values with |")
        if key == "id":
            raise UsageError("--grid: ids are given by the grid (00000, 00001, ...); drop id")
        if text.startswith("@"):
            try:
                values = [line for line in Path(text[1:]).read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"--grid {key}=@{text[1:]}: cannot be read ({type(e).__name__}); give a UTF-8 "
                                 "text file with one value a line") from None
        elif key == "seed" and (m := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)):
            low, high = int(m.group(1)), int(m.group(2))
            if high < low:
                raise UsageError(f"--grid seeds={text}: the range is empty; write low-high")
            values = list(range(low, high + 1))
        else:
            values = text.split("|")
        if not values:
            raise UsageError(f"--grid: {key} has no values")
        grid[key] = [v if isinstance(v, int) else (v if key in ("prompt", "negative_prompt") else _value(v))
                     for v in values]
    return grid


def expand(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [{"id": f"{n:05d}", **dict(zip(keys, combo))}
            for n, combo in enumerate(itertools.product(*(grid[k] for k in keys)))]


def write_jobs(path, jobs: list[dict]) -> bool:
    """Write the jobs file; True if written, False if it already holds exactly these jobs (the same command
    run again resumes). Another file at the path is never overwritten."""
    path = Path(path)
    text = "".join(json.dumps(job, ensure_ascii=False) + "\n" for job in jobs)
    if path.exists():
        if path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text:
            return False
        raise UsageError(f"{path}: exists and holds other jobs than this --grid; pass another jobs file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True
