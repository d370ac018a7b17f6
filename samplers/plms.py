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

from .ddim import ddim_update
from .denoiser import Denoise, pred_x0_from_eps
from .noise import Generators, noise_like
from .schedule import DDIMSchedule
from .step import Step


def _multistep(eps: torch.Tensor, old: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Adams–Bashforth of order len(old) + 1 (at most 4); `old` is oldest first."""
    if len(old) == 1:
        return (3 * eps - old[-1]) / 2
    if len(old) == 2:
        return (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


def plms_steps(denoise: Denoise, x: torch.Tensor, schedule: DDIMSchedule, *, generator: Generators = None,
               eta: float = 0.0) -> Iterator[Step]:
    """Yield one `Step` per PLMS step (the first one makes two UNet calls, the others one).

    Same `schedule` as `ddim_steps`. PLMS is deterministic: eta must be 0.
    Noise is drawn (and multiplied by σ = 0) at every DDIM update, as the original: twice in the
    first step, once in each later one, so the RNG stream advances as in the original sampler.
    """
    if eta != 0:
        raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta}")
    n, ts = len(schedule), schedule.timesteps.tolist()
    alphas, alphas_prev = schedule.alphas.to(x.device), schedule.alphas_prev.to(x.device)
    sigma = torch.zeros((), device=x.device)  # η = 0
    x = x.to(torch.float32)
    old: tuple[torch.Tensor, ...] = ()   # the last three ε̂, oldest first
    for i in range(n):
        k = n - 1 - i   # schedule index, from the top down
        eps, pred_x0 = denoise(x, ts[k])
        if not old:
            x_euler = ddim_update(pred_x0, eps, alphas_prev[k], sigma, noise_like(x, generator))
            # the original evaluates the last timestep again when the run is one step long
            eps_euler, _ = denoise(x_euler, ts[max(k - 1, 0)])
            eps_prime = (eps + eps_euler) / 2
        else:
            eps_prime = _multistep(eps, old)
        pred_x0 = pred_x0_from_eps(x, eps_prime, alphas[k])
        x_next = ddim_update(pred_x0, eps_prime, alphas_prev[k], sigma, noise_like(x, generator))
        step = Step(index=i, total=n, t=ts[k], t_next=ts[k - 1] if k else 0, x=x, eps=eps_prime,
                    pred_x0=pred_x0, x_next=x_next)
        yield step
        old = (*old, eps)[-3:]
        x = step.x_next
