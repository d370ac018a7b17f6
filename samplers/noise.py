"""The one source of noise for every sampler: float32 draws on CPU generators, moved to the latent's device.

`generator` is, everywhere in `samplers`:
    None                  -> torch's global RNG (as the original scripts' `torch.randn`)
    a torch.Generator     -> the whole batch from one stream (the original's seeding: image i depends on
                             the batch size and its place in it)
    a list of B generators -> per-sample seeds: row i is drawn from generator i alone, so image i's noise
                             is the same in a batch of 4 as made by itself
Drawing on the generator's device (the CPU one by default) makes a seed give the same noise on every device.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal float32 noise of `shape` from `generator` (see the module docstring), on `device`."""
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else torch.device("cpu")
        out = torch.randn(shape, generator=generator, dtype=torch.float32, device=gen_device)
    else:
        generators = list(generator)
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}: need one per sample")
        out = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32, device=g.device)
                           for g in generators]).to(generators[0].device if generators else "cpu")
    return out.to(device) if device is not None else out


def noise_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise of x's shape, drawn in float32 on the generator's device and moved to x's."""
    return randn(x.shape, generator, x.device)


class BrownianNoise:
    """Seeded Brownian-motion noise for SDE samplers: `noise(sigma, sigma_next)` is the increment
    (W(σ_next) - W(σ)) / √|σ_next - σ| of one Brownian path W over σ, for each sample.

    k-diffusion draws these from torchsde's `BrownianTree` (`BrownianTreeNoiseSampler`), which we do not
    have. This builds the same path lazily from plain Gaussian draws of `noise_like`: W at a new σ
    above or below every σ seen so far is a free Gaussian increment, and between two seen σ it is the
    Brownian bridge sample. So increments over overlapping intervals are correlated exactly as the
    tree's are (DPM++ SDE asks for [σ_i, s] and then [σ_i, σ_{i+1}] in one step), and disjoint ones are
    independent: the same law, not the same numbers as torchsde. It is reproducible from the
    generator(s) and, with one generator per sample, batch-invariant. Queries must start at a σ no
    higher than the previous query's start (samplers walk σ downwards); older points are forgotten.
    """

    def __init__(self, x: torch.Tensor, generator: Generators = None):
        self.x, self.generator = x, generator
        self.points: list[tuple[float, torch.Tensor]] = []   # (σ, W(σ)), ascending in σ

    def _w(self, s: float) -> torch.Tensor:
        pts = self.points
        for p, w in pts:
            if p == s:
                return w
        if not pts:
            w = torch.zeros(self.x.shape, dtype=torch.float32, device=self.x.device)
            pts.append((s, w))
            return w
        z = noise_like(self.x, self.generator)
        if s < pts[0][0]:
            w = pts[0][1] + (pts[0][0] - s) ** 0.5 * z
        elif s > pts[-1][0]:
            w = pts[-1][1] + (s - pts[-1][0]) ** 0.5 * z
        else:
            i = next(k for k, (p, _) in enumerate(pts) if p > s)
            (lo, w_lo), (hi, w_hi) = pts[i - 1], pts[i]
            f = (s - lo) / (hi - lo)
            w = w_lo + f * (w_hi - w_lo) + ((s - lo) * (hi - s) / (hi - lo)) ** 0.5 * z
        pts.append((s, w))
        pts.sort(key=lambda p: p[0])
        return w

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        sigma, sigma_next = float(sigma), float(sigma_next)
        w0, w1 = self._w(sigma), self._w(sigma_next)
        self.points = [p for p in self.points if p[0] <= sigma]
        return (w1 - w0) / abs(sigma_next - sigma) ** 0.5
