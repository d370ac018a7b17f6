"""A digest of the code that makes the images, so that a Ray worker running other code than the driver
(another version installed on a node, a file edited mid-run) fails its jobs instead of quietly making
other bytes: a new default or an added PNG field changes images without any error."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGES = ("ldm", "models", "samplers", "weights")


@lru_cache(maxsize=1)
def code_digest() -> str:
    import importlib

    digest = hashlib.sha256()
    for name in PACKAGES:
        root = Path(importlib.import_module(name).__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
