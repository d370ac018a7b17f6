"""LMS: the linear multistep method of k-diffusion's `sample_lms` (Adams–Bashforth in σ, order 4).

The probability-flow ODE dx/dσ = d(x, σ) is integrated over [σ_i, σ_{i+1}] with the polynomial through
the last `order` slopes d_i, d_{i-1}, ... at their own σ (Lagrange interpolation on the non-uniform
σ grid):
    x_{i+1} = x_i + Σ_j c_ij d_{i-j},   c_ij = ∫_{σ_i}^{σ_{i+1}} Π_{k≠j} (τ - σ_{i-k}) / (σ_{i-j} - σ_{i-k}) dτ
The order ramps up 1, 2, 3, 4 over the first steps (one UNet call per step). k-diffusion integrates c_ij
with scipy's adaptive `quad`; each basis polynomial has degree order - 1, so Gauss–Legendre with
`order` nodes (exact up to degree 2 order - 1) gives it exactly, without scipy.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .denoiser import SigmaDenoise
from .noise import Generators
from .sigmas import as_floats, to_d
from .step import Step


def lms_coefficient(sigmas: Sequence[float], i: int, j: int, order: int) -> float:
    """c_ij: the integral over [σ_i, σ_{i+1}] of the Lagrange basis polynomial of node σ_{i-j} (float64)."""
    if order - 1 > i:
        raise ValueError(f"order {order} needs {order - 1} earlier steps, step {i} has {i}")
    nodes = [sigmas[i - k] for k in range(order)]
    a, b = sigmas[i], sigmas[i + 1]
    u, w = np.polynomial.legendre.leggauss(max(order, 1))
    tau = (b - a) / 2 * u + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - nodes[k]) / (nodes[j] - nodes[k])
    return float((b - a) / 2 * np.dot(w, basis))


def lms_steps(denoise: SigmaDenoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
              order: int = 4) -> Iterator[Step]:
    """One UNet call per step; `generator` is unused (LMS is deterministic) and kept for the shared signature."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    sig = as_floats(sigmas)
    n = len(sig) - 1
    x = x.to(torch.float32)
    slopes: tuple[torch.Tensor, ...] = ()   # the last `order` slopes d, oldest first
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        eps, x0 = denoise(x, sigma)
        slopes = (*slopes, to_d(x, sigma, x0))[-order:]
        x_next = x
        for j, d in enumerate(reversed(slopes)):
            x_next = x_next + lms_coefficient(sig, i, j, len(slopes)) * d
        step = Step(index=i, total=n, sigma=sigma, sigma_next=sigma_next, x=x, eps=eps, pred_x0=x0, x_next=x_next)
        yield step
        x = step.x_next
