"""Noise schedules: the training ᾱ_t of LatentDiffusion and the DDIM sub-sequence samplers walk.

Notation (Ho et al. 2020; Song et al. 2021):
    betas            -> β_t, t = 0 .. T-1 (T = 1000)
    alphas_cumprod   -> ᾱ_t = Π_{s<=t} (1 - β_s)
    timesteps        -> τ_1 < ... < τ_S, the DDIM sub-sequence the UNet is evaluated at
    alphas           -> ᾱ_{τ_i}
    alphas_prev      -> ᾱ_{τ_{i-1}}, with ᾱ_0 (not 1) before the first: the last step lands on t = 0
    sigmas           -> σ_{τ_i}(η), eq. 16 of Song et al. 2021
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

SD_LINEAR = (0.00085, 0.012)        # every SD 1.x / 2.x config
UPSCALER_LINEAR = (0.0001, 0.02)    # x4-upscaling.yaml, the model and its low-res noise augmentation


def linear_alphas_cumprod(linear_start: float = SD_LINEAR[0], linear_end: float = SD_LINEAR[1],
                          timesteps: int = 1000) -> torch.Tensor:
    """ᾱ of the original "linear" schedule (`make_beta_schedule`), float32 [timesteps].

    Built in float64 and cast once at the end, as `register_schedule` does: it is then bit-equal to
    the `alphas_cumprod` buffer stored in the official checkpoints.
    """
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def alphas_cumprod_from(state_dict: Mapping[str, torch.Tensor] | None = None, *, key: str = "alphas_cumprod",
                        linear_start: float = SD_LINEAR[0], linear_end: float = SD_LINEAR[1],
                        timesteps: int = 1000) -> torch.Tensor:
    """The checkpoint's own `alphas_cumprod` buffer when it has one, else the linear schedule.

    The buffer wins because it is what the model was trained with; a file stripped of it (many
    converted or pruned checkpoints are) falls back on the numbers of its config.
    `key` picks another buffer set, e.g. "low_scale_model.alphas_cumprod" of the x4 upscaler.
    """
    if state_dict is not None and key in state_dict:
        return state_dict[key].detach().to("cpu", torch.float32).clone()
    return linear_alphas_cumprod(linear_start, linear_end, timesteps)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The original "uniform" spacing: `range(0, T, T // S)` shifted by one, ascending, int64.

    The count is that of the range, which is S only when S divides T (S = 3 gives 4 steps,
    S = 7 gives 8): the original runs that many UNet calls, and so do we. Where the last one lands
    on t = T the original fails with an IndexError deep in numpy; we say why instead.
    """
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    c = num_train_timesteps // num_steps
    steps = torch.arange(0, num_train_timesteps, c, dtype=torch.int64) + 1
    if steps[-1] >= num_train_timesteps:
        raise ValueError(f"{num_steps} steps: the original 'uniform' spacing (range(0, {num_train_timesteps}, "
                         f"{c}) + 1) reaches t = {int(steps[-1])}, past the schedule's last timestep; "
                         f"choose another step count")
    return steps


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step DDIM coefficients, indexed like the original's `index` (0 = the step nearest to data)."""
    timesteps: torch.Tensor    # int64 [S], ascending
    alphas: torch.Tensor       # float32 [S]
    alphas_prev: torch.Tensor  # float32 [S]
    sigmas: torch.Tensor       # float32 [S]

    def __len__(self) -> int:
        return len(self.timesteps)


def ddim_schedule(alphas_cumprod: torch.Tensor, num_steps: int, eta: float = 0.0) -> DDIMSchedule:
    """`make_ddim_sampling_parameters` of the original, on the float32 ᾱ buffer.

    σ is computed in float64 (the original mixes a float64 numpy array into it) and then rounded to
    float32 as `torch.full` does when the sampler reads it.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ac = alphas_cumprod.detach().to("cpu", torch.float32)
    ts = ddim_timesteps(num_steps, len(ac))
    alphas = ac[ts]
    alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    a, ap = alphas.double(), alphas_prev.double()
    sigmas = eta * torch.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    return DDIMSchedule(ts, alphas, alphas_prev, sigmas.to(torch.float32))
