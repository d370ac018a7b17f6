"""The driver's side of a run, whatever renders: land each result as it arrives, record it in the
manifest, move the progress bar, and sum up per worker at the end."""
from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from . import landing
from .manifest import Manifest
from .render import message


def record(outdir: Path, result: dict) -> dict:
    """The manifest line for a result, its files landed first (a landing that fails is the job's failure)."""
    base = {"id": result["id"], "worker": result.get("worker"), "seconds": result.get("seconds")}
    if "error" in result:
        return {**base, "error": result["error"]}
    try:
        files, digests = landing.land(outdir, result["id"], result["files"])
    except OSError as e:
        return {**base, "error": f"landing its files in {outdir}: {message(e)}"}
    return {**base, "files": files, "sha256": digests, "images": len(files)}


def drive(results: Iterable[dict], outdir: Path, manifest: Manifest, total: int, done_before: int) -> list[dict]:
    """Land and record every result; the records of this run."""
    records = []
    with tqdm(total=total, initial=done_before, desc="batch", unit="job", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for result in results:
            if "error" not in manifest.records.get(result["id"], {"error": None}):
                continue  # landed already (a retried task's second answer): the first one stands
            line = record(outdir, result)
            manifest.append(line)
            records.append(line)
            bar.update()
    return records


def summary(records: list[dict], seconds: float, skipped: int) -> list[str]:
    """The closing lines: jobs, images, time, and images per minute overall and per worker (a worker's rate
    is over the seconds its jobs took, loading excluded)."""
    images = sum(r.get("images", 0) for r in records)
    failed = sum("error" in r for r in records)
    lines = [f"batch: {len(records)} job(s) run ({failed} failed), {skipped} skipped as already done; "
             f"{images} image(s) in {seconds:.1f} s, {60 * images / max(seconds, 1e-9):.1f} images/minute"]
    per = defaultdict(lambda: [0, 0, 0.0])
    for r in records:
        if r.get("worker") is not None:
            stats = per[r["worker"]]
            stats[0] += 1
            stats[1] += r.get("images", 0)
            stats[2] += r.get("seconds") or 0.0
    for worker, (jobs, n, busy) in sorted(per.items()):
        lines.append(f"  worker {worker}: {jobs} job(s), {n} image(s), {busy:.1f} s busy, "
                     f"{60 * n / max(busy, 1e-9):.1f} images/minute")
    return lines

