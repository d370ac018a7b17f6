"""The UNet seen by a sampler: classifier-free guidance and eps/v parameterisation -> (eps, x̂0).

Notation:
    model(x, t, context)  -> the raw network output: ε̂ for "eps" models, v̂ for "v" models
    alpha                 -> ᾱ_t of the training schedule at the timestep the model saw
    v                     -> √ᾱ_t ε - √(1-ᾱ_t) x0 (Salimans & Ho 2022, sec. 4)
    sigma                 -> σ = √((1-ᾱ)/ᾱ): x_σ = x0 + σ ε = x_t / √ᾱ (Karras et al. 2022)
    c_in, c_skip, c_out   -> the preconditioning of Karras et al. 2022 (Table 1, σ_data = 1) that turns
                             the VP network into the denoiser D(x_σ; σ) = c_skip x_σ + c_out F(c_in x_σ; t(σ))

`make_guided` is the only place guidance is applied: `make_denoiser` (timesteps, for DDIM/PLMS/DDPM)
and `make_sigma_denoiser` (noise levels, for the k-diffusion samplers) both wrap it, and every sampler
receives `denoise(x, t)` or `denoise(x, sigma) -> (eps, pred_x0)` and never sees the model, the
conditioning or the guidance scale.

Conditioning is a context tensor (text only), or for the hybrid models a dict (`Conditioning`):
    {"c_crossattn": context, "c_concat": channels concatenated to the latent, "y": class labels}
`apply_model` is the one place that turns it into a UNet call, as the original `DiffusionWrapper`
("hybrid": cat([x, c_concat], 1) with the context; "hybrid-adm": also `y`, the x4 upscaler's noise
level). The sampler's x alone is scaled (c_in in sigma space); c_concat enters as it is, for both halves
of the guided batch, so every sampler runs the inpainting, depth and upscaling models unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .sigmas import model_sigmas, sigma_to_t

Denoise = Callable[[torch.Tensor, "int | torch.Tensor"], "tuple[torch.Tensor, torch.Tensor]"]
SigmaDenoise = Callable[[torch.Tensor, "float | torch.Tensor"], "tuple[torch.Tensor, torch.Tensor]"]
Guided = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PARAMETERIZATIONS = ("eps", "v")


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


def apply_model(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """model(x, t, context), or for dict conditioning model(cat([x, c_concat], 1), t, c_crossattn, y=y)."""
    if not isinstance(cond, dict):
        return model(x, t, cond)
    unknown = set(cond) - {"c_crossattn", "c_concat", "y"}
    if unknown:
        raise ValueError(f"unknown conditioning keys {sorted(unknown)}; use c_crossattn, c_concat and y")
    if cond.get("c_concat") is not None:
        x = torch.cat([x, cond["c_concat"].to(x.dtype)], dim=1)
    extra = {"y": cond["y"]} if cond.get("y") is not None else {}
    return model(x, t, cond["c_crossattn"], **extra)


def make_guided(model: Callable, cond: Any, uncond: Any, scale: float, *,
                dtype: torch.dtype | None = None) -> Guided:
    """Wrap `model(x, t, context)` into `guided(x, t) -> raw output` (ε̂ or v̂), float32.

    With guidance (`uncond` given and `scale != 1`) the model is called once on the batch
    `[x, x]`, `[t, t]`, `[uncond, cond]` and out = out_u + scale (out_c - out_u), exactly as the
    original DDIM/PLMS samplers; otherwise once on `cond` alone (a tensor, or a dict: `apply_model`;
    uncond and cond then have the same keys, and are batched key by key). The guidance mixes raw outputs
    (ε̂ or v̂), as the original does. `t` is a [B] tensor on x's device, passed as it is (integer
    timesteps for the alpha space, fractional float ones for the sigma space).
    `dtype`: the model's dtype; x and the conditioning are cast to it for the call only, and the
    output comes back as float32, so latents and sampler math stay float32.
    """
    guided = uncond is not None and scale != 1.0
    context = _to(_cat(uncond, cond) if guided else cond, dtype)

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if not guided:
            return apply_model(model, _to(x, dtype), t, context).to(torch.float32)
        out = apply_model(model, _to(torch.cat([x, x]), dtype), torch.cat([t, t]), context).to(torch.float32)
        out_u, out_c = out.chunk(2)
        return out_u + scale * (out_c - out_u)

    return call


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")


def _on(cache: dict, cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`cpu` on `device`, copied once per device."""
    if device not in cache:
        cache[device] = cpu.to(device)
    return cache[device]


def make_denoiser(model: Callable, cond: Any, uncond: Any, scale: float, parameterization: str,
                  alphas_cumprod: torch.Tensor, *, dtype: torch.dtype | None = None) -> Denoise:
    """Wrap `model(x, t, context)` into `denoise(x, t) -> (eps, pred_x0)`, both float32.

    The model is called through `make_guided` with integer (int64) timesteps. For v models the
    conversion uses the full training ᾱ at t (`predict_eps_from_z_and_v`), which equals the DDIM ᾱ
    of that step.
    """
    _check_parameterization(parameterization)
    guided = make_guided(model, cond, uncond, scale, dtype=dtype)
    ac_cpu = alphas_cumprod.detach().to("cpu", torch.float32)
    ac_on: dict[torch.device, torch.Tensor] = {}

    def denoise(x: torch.Tensor, t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(torch.float32)
        if not isinstance(t, torch.Tensor):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        t = t.to(device=x.device, dtype=torch.long)
        out = guided(x, t)
        alpha = append_dims(_on(ac_on, ac_cpu, x.device)[t], x.ndim)
        if parameterization == "v":
            eps = alpha.sqrt() * out + (1.0 - alpha).sqrt() * x
            pred_x0 = alpha.sqrt() * x - (1.0 - alpha).sqrt() * out
        else:
            eps = out
            pred_x0 = pred_x0_from_eps(x, eps, alpha)
        return eps, pred_x0

    return denoise


def make_sigma_denoiser(model: Callable, cond: Any, uncond: Any, scale: float, parameterization: str,
                        alphas_cumprod: torch.Tensor, *, dtype: torch.dtype | None = None,
                        quantize: bool = False) -> SigmaDenoise:
    """Wrap `model(x, t, context)` into `denoise(x, sigma) -> (eps, pred_x0)` on x_σ = x0 + σ ε, float32.

    k-diffusion's `CompVisDenoiser` / `CompVisVDenoiser` (Karras et al. 2022, Table 1 with σ_data = 1):
    the network sees c_in x_σ = x_σ / √(σ² + 1), the VP latent at t(σ), with t(σ) interpolated in log σ
    over the model's training σ_t (`sigmas.sigma_to_t`: fractional, passed as a float32 tensor, which
    the sinusoidal timestep embedding takes as it is; `quantize=True` rounds it to the nearest
    training timestep), then
        eps models:  D = x_σ - σ ε̂                              (c_skip = 1, c_out = -σ)
        v models:    D = x_σ / (σ² + 1) - σ / √(σ² + 1) v̂       (c_skip = 1/(σ²+1), c_out = -σ/√(σ²+1))
    and eps = (x_σ - D) / σ, computed without the division (for v: ε̂ = c_in v̂ + σ/(σ²+1) x_σ).
    `sigma` is a float, a 0-dim tensor or one σ per sample.
    """
    _check_parameterization(parameterization)
    guided = make_guided(model, cond, uncond, scale, dtype=dtype)
    log_sigmas_cpu = model_sigmas(alphas_cumprod).log()
    log_sigmas_on: dict[torch.device, torch.Tensor] = {}

    def denoise(x: torch.Tensor, sigma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        t = sigma_to_t(sigma, _on(log_sigmas_on, log_sigmas_cpu, x.device), quantize)
        s = append_dims(sigma, x.ndim)
        c_in = (s ** 2 + 1) ** -0.5
        out = guided(x * c_in, t)
        if parameterization == "v":
            pred_x0 = x * c_in ** 2 - s * c_in * out
            eps = c_in * out + s * c_in ** 2 * x
        else:
            eps = out
            pred_x0 = x - s * out
        return eps, pred_x0

    return denoise
