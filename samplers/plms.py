"""PLMS: Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds".

The pseudo linear multistep method as in the original `PLMSSampler`: every step is the η = 0 DDIM
update (the "transfer part", eq. 11 = DDIM eq. 12) driven by a combination ε' of noise estimates:
    first step   ε' = (ε̂(x_t, t) + ε̂(x̃, t_next)) / 2, x̃ the DDIM step with ε̂(x_t, t)
                 (pseudo improved Euler: two UNet calls)
    then         Adams–Bashforth on the history of ε̂, orders 2, 3 and 4 (eq. 12):
                 (3e₀ - e₁)/2,  (23e₀ - 16e₁ + 5e₂)/12,  (55e₀ - 59e₁ + 37e₂ - 9e₃)/24
The history holds ε̂ itself (not ε'), as the original. v-prediction models work too: each v̂ is
turned into ε̂ at its own x and t by the denoiser before it enters the history (the original
refuses v models).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .ddim import _check_t_start, ddim_update
from .denoiser import Denoise, pred_x0_from_eps
from .noise import Generators, noise_like
from .schedule import ddim_schedule
from .step import Step, drain


def _multistep(eps: torch.Tensor, old: list[torch.Tensor]) -> torch.Tensor:
    """Adams–Bashforth of order len(old) + 1 (at most 4); `old` is oldest first."""
    if len(old) == 1:
        return (3 * eps - old[-1]) / 2
    if len(old) == 2:
        return (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


def plms_steps(denoise: Denoise, x: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int, *,
               eta: float = 0.0, generator: Generators = None,
               t_start: int | None = None) -> Iterator[Step]:
    """Yield one `Step` per PLMS step (the first one makes two UNet calls, the others one).

    Same timesteps, `t_start` and signature as `ddim_steps`. PLMS is deterministic: eta must be 0.
    Noise is drawn (and multiplied by σ = 0) at every DDIM update, as the original: twice in the
    first step, once in each later one, so the RNG stream advances as in the original sampler.
    """
    if eta != 0:
        raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta}")
    sched = ddim_schedule(alphas_cumprod, num_steps)
    n = _check_t_start(t_start, len(sched))
    ts = sched.timesteps.tolist()
    order = list(reversed(range(n)))
    alphas, alphas_prev = sched.alphas.to(x.device), sched.alphas_prev.to(x.device)
    sigma = torch.zeros((), device=x.device)  # η = 0
    x = x.to(torch.float32)
    old: list[torch.Tensor] = []
    for i, k in enumerate(order):
        eps, pred_x0 = denoise(x, ts[k])
        if not old:
            x_euler = ddim_update(pred_x0, eps, alphas_prev[k], sigma, noise_like(x, generator))
            # the original evaluates the last timestep again when the run is one step long
            eps_euler, _ = denoise(x_euler, ts[order[min(i + 1, n - 1)]])
            eps_prime = (eps + eps_euler) / 2
        else:
            eps_prime = _multistep(eps, old)
        pred_x0 = pred_x0_from_eps(x, eps_prime, alphas[k])
        x_next = ddim_update(pred_x0, eps_prime, alphas_prev[k], sigma, noise_like(x, generator))
        step = Step(i, n, ts[k], ts[k - 1] if k else 0, x, eps_prime, pred_x0, x_next)
        yield step
        old = (old + [eps])[-3:]
        x = step.x_next


def plms_sample(denoise: Denoise, x: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int,
                **kwargs) -> torch.Tensor:
    """`plms_steps` run to the end: the final latent."""
    return drain(plms_steps(denoise, x, alphas_cumprod, num_steps, **kwargs), x.to(torch.float32))
