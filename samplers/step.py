"""What a sampler yields each iteration, and the one way to run a sampler to its end.

A sampler is a generator of `Step`s: a progress bar is `tqdm(steps)`, a preview is
`decode(step.pred_x0)`, stopping early is `break`, an intervention is `step.x_next = ...` before
asking for the next step (the sampler continues from whatever `step.x_next` then holds).

Alpha-space samplers (DDIM, PLMS, DDPM) walk training timesteps and fill `t`/`t_next`, leaving
`sigma`/`sigma_next` None; sigma-space samplers (Euler, Heun, DPM2, LMS, DPM++) walk noise levels
and fill `sigma`/`sigma_next`, leaving `t`/`t_next` None. Their `x` is x_σ = x0 + σ ε, which is the
alpha-space latent times √(σ² + 1); both end on the clean latent.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Step:
    index: int              # 0 for the first step of this run, counting up
    total: int              # steps in this run
    t: int | None           # timestep the UNet saw for x (alpha space)
    t_next: int | None      # timestep x_next sits at: ᾱ[t_next] (0 after the last step, ᾱ[0])
    x: torch.Tensor         # latent entering the step
    eps: torch.Tensor       # noise estimate the update used (PLMS: its multistep combination)
    pred_x0: torch.Tensor   # x̂0 the update used (sigma space: the denoiser's output at (x, σ))
    x_next: torch.Tensor    # latent leaving the step; replace it to steer the rest of the run
    sigma: float | None = None       # noise level of x (sigma space)
    sigma_next: float | None = None  # noise level of x_next (0 after the last step)


def drain(steps: Iterator[Step], x: torch.Tensor) -> torch.Tensor:
    """Run a step generator to the end; the final latent (`x` itself when there are no steps)."""
    for step in steps:
        x = step.x_next
    return x


# update(i, x, σ, σ_next) -> (eps, pred_x0, x_next)
Update = Callable[[int, torch.Tensor, float, float], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


def sigma_loop(x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], update: Update) -> Iterator[Step]:
    """The loop every sigma-space sampler shares: one `Step` per pair (σ_i, σ_{i+1}), continuing from
    whatever `x_next` holds when the next step is asked for. `update` holds the sampler's math (and
    any history it keeps between calls); the σ arrive as Python floats."""
    sig = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    n = len(sig) - 1
    x = x.to(torch.float32)
    for i in range(n):
        eps, pred_x0, x_next = update(i, x, sig[i], sig[i + 1])
        step = Step(i, n, None, None, x, eps, pred_x0, x_next, sig[i], sig[i + 1])
        yield step
        x = step.x_next
