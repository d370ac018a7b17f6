"""The UNet seen by a sampler: classifier-free guidance and eps/v parameterisation -> (eps, x̂0).

Notation:
    model(x, t, context)  -> the raw network output: ε̂ for "eps" models, v̂ for "v" models
    alpha                 -> ᾱ_t of the training schedule at the timestep the model saw
    v                     -> √ᾱ_t ε - √(1-ᾱ_t) x0 (Salimans & Ho 2022, sec. 4)

This is the only place guidance is applied: every sampler receives `denoise(x, t) -> (eps, pred_x0)`
and never sees the model, the conditioning or the guidance scale.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Denoise = Callable[[torch.Tensor, "int | torch.Tensor"], "tuple[torch.Tensor, torch.Tensor]"]


def append_dims(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so a per-sample coefficient broadcasts over a latent of `ndim` dims."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def pred_x0_from_eps(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t (Song et al. 2021, eq. 9 solved for x0)."""
    return (x - (1.0 - alpha).sqrt() * eps) / alpha.sqrt()


def _cat(u: Any, c: Any) -> Any:
    """torch.cat([uncond, cond]) through the dicts/lists the hybrid models condition with."""
    if isinstance(c, torch.Tensor):
        return torch.cat([u, c])
    if isinstance(c, dict):
        return {k: _cat(u[k], c[k]) for k in c}
    if isinstance(c, (list, tuple)):
        return type(c)(_cat(a, b) for a, b in zip(u, c))
    raise TypeError(f"cannot batch conditioning of type {type(c).__name__}")


def _to(c: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors to the model's dtype; integer ones (timesteps, noise levels) stay as they are."""
    if dtype is None or c is None:
        return c
    if isinstance(c, torch.Tensor):
        return c.to(dtype) if c.is_floating_point() else c
    if isinstance(c, dict):
        return {k: _to(v, dtype) for k, v in c.items()}
    if isinstance(c, (list, tuple)):
        return type(c)(_to(v, dtype) for v in c)
    return c


def make_denoiser(model: Callable, cond: Any, uncond: Any, scale: float, parameterization: str,
                  alphas_cumprod: torch.Tensor, *, dtype: torch.dtype | None = None) -> Denoise:
    """Wrap `model(x, t, context)` into `denoise(x, t) -> (eps, pred_x0)`, both float32.

    With guidance (`uncond` given and `scale != 1`) the model is called once on the batch
    `[x, x]`, `[t, t]`, `[uncond, cond]` and out = out_u + scale (out_c - out_u), exactly as the
    original DDIM/PLMS samplers; otherwise once on `cond` alone. The guidance mixes raw outputs
    (ε̂ or v̂), then converts, as the original does; for v models the conversion uses the full
    training ᾱ at t (`predict_eps_from_z_and_v`), which equals the DDIM ᾱ of that step.
    `dtype`: the model's dtype; x and the conditioning are cast to it for the call only, and the
    output comes back as float32, so latents and sampler math stay float32.
    """
    if parameterization not in ("eps", "v"):
        raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
    guided = uncond is not None and scale != 1.0
    context = _to(_cat(uncond, cond) if guided else cond, dtype)
    ac_cpu = alphas_cumprod.detach().to("cpu", torch.float32)
    ac_on: dict[torch.device, torch.Tensor] = {}

    def denoise(x: torch.Tensor, t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(torch.float32)
        if not isinstance(t, torch.Tensor):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        t = t.to(device=x.device, dtype=torch.long)
        if guided:
            out = model(_to(torch.cat([x, x]), dtype), torch.cat([t, t]), context).to(torch.float32)
            out_u, out_c = out.chunk(2)
            out = out_u + scale * (out_c - out_u)
        else:
            out = model(_to(x, dtype), t, context).to(torch.float32)

        if x.device not in ac_on:
            ac_on[x.device] = ac_cpu.to(x.device)
        alpha = append_dims(ac_on[x.device][t], x.ndim)
        if parameterization == "v":
            eps = alpha.sqrt() * out + (1.0 - alpha).sqrt() * x
            pred_x0 = alpha.sqrt() * x - (1.0 - alpha).sqrt() * out
        else:
            eps = out
            pred_x0 = pred_x0_from_eps(x, eps, alpha)
        return eps, pred_x0

    return denoise
