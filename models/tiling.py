"""Tiled VAE: encode and decode large images a few overlapping tiles at a time.

A 1024² decode holds 512 MB float32 activations per 128-channel layer at full resolution; in 512-pixel
tiles the decoder's activations are a quarter of that whatever the image size. Tiles are planned on the
latent grid, all of the full tile size (evenly spread, so no sliver tiles at the edges), and neighbours
are crossfaded linearly over their whole overlap, so no seam is left.

Not bit-equal to the untiled result: each tile's group norms see only that tile's statistics and its
convolutions see zero padding at inner tile edges (diffusers' `enable_tiling` differs in the same way).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Tiling:
    """Tile size and overlap in latent pixels (×8 in image pixels for SD): 64 is the 512 px the
    decoder was trained at; the overlap is the band two neighbours crossfade over."""
    tile: int = 64
    overlap: int = 16

    def __post_init__(self):
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"VAE tiling needs 0 <= overlap < tile, got tile {self.tile}, overlap {self.overlap}")


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of each tile along one axis of `length`: the fewest full-size tiles that overlap by
    at least `overlap`, spread evenly from one edge to the other."""
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(i * (length - tile) / (n - 1)) for i in range(n)]
    return [(s, s + tile) for s in starts]


def _ramps(spans: list[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """Per tile, its blending weight along the axis in output pixels: 1 inside, falling linearly to
    nothing across the overlap with each neighbour, so two overlapping tiles' weights sum to 1
    (pixel centres, hence the 0.5: no weight is exactly 0 and none of a tile's pixels is wasted)."""
    ramps = []
    for i, (s, e) in enumerate(spans):
        x = torch.arange(s * scale, e * scale, dtype=torch.float32) + 0.5
        w = torch.ones_like(x)
        if i > 0 and spans[i - 1][1] > s:
            w = torch.minimum(w, (x - s * scale) / ((spans[i - 1][1] - s) * scale))
        if i + 1 < len(spans) and spans[i + 1][0] < e:
            w = torch.minimum(w, (e * scale - x) / ((e - spans[i + 1][0]) * scale))
        ramps.append(w)
    return ramps


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiling: Tiling, f_in: int,
          f_out: int) -> torch.Tensor:
    """`fn(x)` computed tile by tile and blended. `f_in`/`f_out`: pixels of x / of the output per latent
    pixel (decode: 1 and 8, encode: 8 and 1). An input within one tile, or whose size is not a multiple
    of `f_in`, goes through `fn` whole."""
    h, w = x.shape[-2:]
    if h % f_in or w % f_in or (h <= tiling.tile * f_in and w <= tiling.tile * f_in):
        return fn(x)
    rows = tile_spans(h // f_in, tiling.tile, tiling.overlap)
    cols = tile_spans(w // f_in, tiling.tile, tiling.overlap)
    row_w, col_w = _ramps(rows, f_out), _ramps(cols, f_out)
    out, dtype = None, x.dtype
    for (r0, r1), wr in zip(rows, row_w):
        for (c0, c1), wc in zip(cols, col_w):
            y = fn(x[..., r0 * f_in:r1 * f_in, c0 * f_in:c1 * f_in])
            if out is None:  # accumulated in float32: fp16 sums of weighted tiles lose the low bits
                out = torch.zeros((*y.shape[:-2], h // f_in * f_out, w // f_in * f_out), device=y.device)
                dtype = y.dtype
            weight = (wr[:, None] * wc[None, :]).to(y.device)
            out[..., r0 * f_out:r1 * f_out, c0 * f_out:c1 * f_out] += y.float() * weight
    # The weights are separable, so their sum over tiles is the product of the per-axis sums.
    norm = torch.zeros(h // f_in * f_out), torch.zeros(w // f_in * f_out)
    for (s, e), wr in zip(rows, row_w):
        norm[0][s * f_out:e * f_out] += wr
    for (s, e), wc in zip(cols, col_w):
        norm[1][s * f_out:e * f_out] += wc
    out /= (norm[0][:, None] * norm[1][None, :]).to(out.device)
    return out.to(dtype)


def enable_vae_tiling(vae: nn.Module, tiling: Tiling | None = Tiling()) -> None:
    """Make `vae.encode`/`vae.decode` work in tiles from now on (None switches it off again); inputs
    that fit in one tile are not affected."""
    if tiling is not None and not isinstance(tiling, Tiling):
        raise TypeError(f"expected a models.tiling.Tiling, got {type(tiling).__name__}")
    vae.tiling = tiling
