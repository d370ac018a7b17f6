"""Noise schedules: the training ᾱ_t of LatentDiffusion and the DDIM sub-sequence samplers walk.

Notation (Ho et al. 2020; Song et al. 2021):
    betas            -> β_t, t = 0 .. T-1 (T = 1000)
    alphas_cumprod   -> ᾱ_t = Π_{s<=t} (1 - β_s)
    timesteps        -> τ_1 < ... < τ_S, the DDIM sub-sequence the UNet is evaluated at
    alphas           -> ᾱ_{τ_i}
    alphas_prev      -> ᾱ_{τ_{i-1}}, with ᾱ_0 (not 1) before the first: the last step lands on t = 0
    sigmas           -> σ_{τ_i}(η), eq. 16 of Song et al. 2021 (`ddim_sigmas`: η is the sampler's choice)
    t_start          -> img2img runs the last t_start steps of a schedule, from x0 noised one DDIM step
                        above the first of them (`ddim_start`, the original's stochastic_encode + decode)
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .noise import Generators, noise_like

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
    """Per-step DDIM ᾱ, indexed like the original's `index` (0 = the step nearest to data)."""
    timesteps: torch.Tensor    # int64 [S], ascending
    alphas: torch.Tensor       # float32 [S]
    alphas_prev: torch.Tensor  # float32 [S]

    def __len__(self) -> int:
        return len(self.timesteps)

    def __getitem__(self, index: slice) -> DDIMSchedule:
        """`schedule[:k]`: the k steps nearest to data, the part an img2img run of k steps walks."""
        return DDIMSchedule(self.timesteps[index], self.alphas[index], self.alphas_prev[index])


def ddim_schedule(alphas_cumprod: torch.Tensor, num_steps: int) -> DDIMSchedule:
    """The ᾱ half of the original's `make_ddim_sampling_parameters`, on the float32 ᾱ buffer (the σ(η)
    half is `ddim_sigmas`: η is the sampler's option, not the schedule's)."""
    ac = alphas_cumprod.detach().to("cpu", torch.float32)
    ts = ddim_timesteps(num_steps, len(ac))
    return DDIMSchedule(ts, ac[ts], torch.cat([ac[:1], ac[ts[:-1]]]))


def ddim_sigmas(schedule: DDIMSchedule, eta: float = 0.0) -> torch.Tensor:
    """σ_{τ_i}(η) of eq. 16, float32 [S], as `make_ddim_sampling_parameters`: computed in float64 (the
    original mixes a float64 numpy array into it), then rounded to float32 as `torch.full` does."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    a, ap = schedule.alphas.double(), schedule.alphas_prev.double()
    return (eta * torch.sqrt((1 - ap) / (1 - a) * (1 - a / ap))).to(torch.float32)


# ---------------------------------------------------------------- img2img: where a run of t_start steps starts
def check_t_start(t_start: int | None, n: int) -> int:
    """How many of a schedule's n steps a run takes: t_start (0..n), or all n when None."""
    if t_start is None:
        return n
    if not 0 <= t_start <= n:
        raise ValueError(f"t_start must be in 0..{n}, got {t_start}")
    return t_start


def _q_sample(x0: torch.Tensor, alpha: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """√ᾱ x0 + √(1-ᾱ) z, x0 forward-noised to ᾱ (Ho et al. 2020, eq. 4), float32 on x0's device."""
    x0, alpha = x0.to(torch.float32), alpha.to(x0.device)
    return alpha.sqrt() * x0 + (1.0 - alpha).sqrt() * noise.to(x0.device, torch.float32)


def stochastic_encode(x0: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int, t_enc: int,
                      noise: torch.Tensor | None = None,
                      generator: Generators = None) -> torch.Tensor:
    """Noise a clean latent to DDIM step `t_enc`: √ᾱ x0 + √(1-ᾱ) z with ᾱ = ddim alphas[t_enc].

    As the original `DDIMSampler.stochastic_encode(x0, t_enc)` (use_original_steps=False).
    noise: when None, drawn like the samplers' noise (`noise_like`, float32 on the CPU generator).
    """
    sched = ddim_schedule(alphas_cumprod, num_steps)
    if not 0 <= t_enc < len(sched):
        raise ValueError(f"t_enc must be in 0..{len(sched) - 1}, got {t_enc}")
    return _q_sample(x0, sched.alphas[t_enc], noise if noise is not None else noise_like(x0, generator))


def ddim_start(noise: torch.Tensor, schedule: DDIMSchedule, x0: torch.Tensor | None = None,
               t_start: int | None = None) -> tuple[torch.Tensor, DDIMSchedule]:
    """(x, the steps to run) of an alpha-space run from unit `noise`: txt2img starts at x_T = noise;
    img2img (x0 given) runs the last `t_start` steps, `schedule[:t_start]`, from x0 noised to DDIM
    step t_start (`stochastic_encode`). As the original, that is one DDIM step above the first step
    run (timesteps[t_start - 1]): the original images are made that way. At t_start = S, where the
    original indexes past its table, x0 is noised to the top step instead."""
    n = check_t_start(t_start, len(schedule))
    if x0 is None:
        return noise.to(torch.float32), schedule[:n]
    return _q_sample(x0, schedule.alphas[min(n, len(schedule) - 1)], noise), schedule[:n]
