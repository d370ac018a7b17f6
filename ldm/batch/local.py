"""Local mode: one process renders every pending job (batched by compatible settings across the whole
file), its models loaded once and kept. No Ray."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch

from .render import Renderer


def run_local(jobs: list[dict], batch_size: int, threads: Optional[int] = None) -> Iterator[dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads or 1)  # as a Ray actor's default: the thread count changes CPU roundings
    renderer = Renderer(batch_size)
    try:
        yield from renderer.render(jobs)
    finally:
        renderer.close()
        torch.set_num_threads(before)
