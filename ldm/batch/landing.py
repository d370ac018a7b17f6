"""Putting a finished job's files into DIR, all or nothing.

The files are written (and fsync'ed) into a hidden folder DIR/.landing-<id>-<random>, which is then
renamed to DIR/<id>: a killed run leaves either the whole folder or only the hidden one, which the next
run removes. A rename never replaces a folder that holds files, so no image is overwritten.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

PREFIX = ".landing-"


def clean(outdir: Path) -> None:
    """Remove what killed runs left half-written (only our own hidden folders)."""
    for path in Path(outdir).glob(PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def land(outdir: Path, job_id: str, files: list[tuple[str, bytes]]) -> tuple[list[str], list[str]]:
    """Write the job's (name, bytes) files to DIR/<id>/; (their paths relative to DIR, their sha256s)."""
    outdir = Path(outdir)
    tmp = outdir / f"{PREFIX}{job_id}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        for name, data in files:
            with open(tmp / name, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, outdir / job_id)  # fails (OSError) rather than replace a folder with files in it
        fd = os.open(outdir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the new name is on disk before the manifest says the job is done
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [f"{job_id}/{name}" for name, _ in files], [sha256(data) for _, data in files]


def landed(outdir: Path, job_id: str) -> tuple[list[str], list[str]] | None:
    """A folder a killed run renamed into place but could not record: (files, sha256s), else None."""
    folder = Path(outdir) / job_id
    if not folder.is_dir():
        return None
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if not names:
        return None
    return [f"{job_id}/{n}" for n in names], [sha256((folder / n).read_bytes()) for n in names]
