"""What a sampler yields each iteration, and the one way to run a sampler to its end.

A sampler is a generator function of `Step`s with its loop in its own body:

    for i in range(n):
        ...                                   # the sampler's math for step i
        step = Step(index=i, total=n, x=x, eps=eps, pred_x0=x0, x_next=x_next, sigma=..., sigma_next=...)
        yield step
        x = step.x_next                       # whatever the caller left there

A progress bar is `tqdm(steps)`, a preview is `decode(step.pred_x0)`, stopping early is `break`, an
intervention is `step.x_next = ...` before asking for the next step (the sampler continues from
whatever `step.x_next` then holds).

Alpha-space samplers (DDIM, PLMS, DDPM) walk training timesteps and fill `t`/`t_next`, leaving
`sigma`/`sigma_next` None; sigma-space samplers (Euler, Heun, DPM2, LMS, DPM++) walk noise levels
and fill `sigma`/`sigma_next`, leaving `t`/`t_next` None. Their `x` is x_σ = x0 + σ ε, which is the
alpha-space latent times √(σ² + 1); both end on the clean latent.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(kw_only=True)   # built by name only: a field added later cannot shift another's meaning
class Step:
    index: int              # 0 for the first step of this run, counting up
    total: int              # steps in this run
    x: torch.Tensor         # latent entering the step
    eps: torch.Tensor       # noise estimate the update used (PLMS: its multistep combination)
    pred_x0: torch.Tensor   # x̂0 the update used (sigma space: the denoiser's output at (x, σ))
    x_next: torch.Tensor    # latent leaving the step; replace it to steer the rest of the run
    t: int | None = None             # timestep the UNet saw for x (alpha space)
    t_next: int | None = None        # timestep x_next sits at: ᾱ[t_next] (0 after the last step, ᾱ[0])
    sigma: float | None = None       # noise level of x (sigma space)
    sigma_next: float | None = None  # noise level of x_next (0 after the last step)


def drain(steps: Iterator[Step], x: torch.Tensor) -> torch.Tensor:
    """Run a step generator to the end; the final latent (`x` itself when there are no steps)."""
    for step in steps:
        x = step.x_next
    return x
