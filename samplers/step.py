"""What a sampler yields each iteration, and the one way to run a sampler to its end.

A sampler is a generator of `Step`s: a progress bar is `tqdm(steps)`, a preview is
`decode(step.pred_x0)`, stopping early is `break`, an intervention is `step.x_next = ...` before
asking for the next step (the sampler continues from whatever `step.x_next` then holds).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Step:
    index: int              # 0 for the first step of this run, counting up
    total: int              # steps in this run
    t: int                  # timestep the UNet saw for x
    t_next: int             # timestep x_next sits at: ᾱ[t_next] (0 after the last step, ᾱ[0])
    x: torch.Tensor         # latent entering the step
    eps: torch.Tensor       # noise estimate the update used (PLMS: its multistep combination)
    pred_x0: torch.Tensor   # x̂0 the update used
    x_next: torch.Tensor    # latent leaving the step; replace it to steer the rest of the run


def drain(steps: Iterator[Step], x: torch.Tensor) -> torch.Tensor:
    """Run a step generator to the end; the final latent (`x` itself when there are no steps)."""
    for step in steps:
        x = step.x_next
    return x
