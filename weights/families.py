"""Which model a checkpoint holds, from its key names and shapes alone.

Shapes are enough: the UNet's first convolution counts the input channels (4 latent, +4 masked
latent +1 mask for inpainting, +1 depth, +3 low-res RGB for the upscaler), the text encoder's
prefix tells CLIP (SD 1.x) from OpenCLIP (SD 2.x), and a file without a text encoder still shows
its generation in the cross-attention width (768 vs 1024) or in `proj_in` (1x1 conv vs Linear).
SD 2 512-base and 768-v share one layout; their parameterisation is not in the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from weights.components import PREFIXES, is_lone_vae
from weights.errors import CheckpointError, PathLike


@dataclass(frozen=True)
class Generation:
    """What tells SD 1.x from SD 2.x in a file: its text encoder's keys, or in a UNet-only file the UNet's
    cross-attention width or its transformers' proj_in."""
    name: str
    label: str
    text: str  # the text encoder's component in PREFIXES
    text_norm: str  # key ending of the text encoder's last LayerNorm weight, whose length is its output width
    context_width: int  # the official text encoder's width (CLIP ViT-L/14 768, OpenCLIP ViT-H/14 1024)
    proj_in_rank: int  # 4: 1x1 Conv2d proj_in; 2: Linear (use_linear_in_transformer)


@dataclass(frozen=True)
class Rule:
    """A family as its tensors show it; models/config.py's FAMILIES holds the network side under the same name."""
    name: str
    generation: str
    in_channels: int  # the UNet's first convolution: 4 latent, +4 masked latent +1 mask, +1 depth, +3 low-res RGB
    label_emb: bool = False  # a class-label embedding (the upscaler's noise level)


GENERATIONS = (
    Generation("sd1", "SD 1.x", "clip_text", "final_layer_norm.weight", 768, 4),  # with or without `text_model.`
    Generation("sd2", "SD 2.x", "openclip_text", "ln_final.weight", 1024, 2),
)
RULES = (
    Rule("sd1", "sd1", 4),
    Rule("sd1_inpaint", "sd1", 9),
    Rule("sd2", "sd2", 4),
    Rule("sd2_inpaint", "sd2", 9),
    Rule("sd2_depth", "sd2", 5),
    Rule("x4_upscaler", "sd2", 7, label_emb=True),
)
FAMILIES = tuple(r.name for r in RULES) + ("vae",)


def _shape(value: Any) -> tuple[int, ...]:
    """A shape from a tensor, a shape, or a (shape, dtype) pair as `read_header` gives."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)):
        return tuple(value[0])
    return tuple(value)


def _first(shapes: Mapping[str, tuple], prefix: str, suffix: str) -> Optional[tuple[int, ...]]:
    return next((s for k, s in shapes.items() if k.startswith(prefix) and k.endswith(suffix)), None)


def _text_encoder(shapes: Mapping[str, tuple]) -> tuple[Optional[Generation], Optional[int]]:
    """(generation, output width) of the text encoder in the file, (None, None) without one."""
    for gen in GENERATIONS:
        prefix = PREFIXES[gen.text]
        if any(k.startswith(prefix) for k in shapes):
            norm = _first(shapes, prefix, gen.text_norm)
            return gen, norm[0] if norm else None
    return None, None


def _not_sd(shapes: Mapping[str, tuple]) -> str:
    keys = list(shapes)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint; this project runs Stable Diffusion 1.x and 2.x only"
    if any(k.startswith(("down_blocks.", "unet.down_blocks.", "mid_block.")) for k in keys):
        return ("diffusers-format weights; pass the original single-file checkpoint (.safetensors/.ckpt) "
                "instead")
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") if keys else "no keys at all"
    return (f"no Stable Diffusion UNet (model.diffusion_model.*) or VAE (encoder.*/decoder.*) keys "
            f"({len(keys)} keys: {shown})")


def detect_family(shapes: Mapping[str, Any], source: Optional[PathLike] = None) -> str:
    """One of FAMILIES for `{key: shape}` (tensors and `(shape, dtype)` pairs work too).

    `source` names the file in the CheckpointError raised for anything unrecognised.
    """
    shapes = {k: _shape(v) for k, v in shapes.items()}
    if any(k.startswith("conditioner.embedders.") for k in shapes):  # SDXL also has model.diffusion_model.*
        raise CheckpointError(_not_sd(shapes), source)
    unet = PREFIXES["unet"]
    if not any(k.startswith(unet) for k in shapes):
        decoder = is_lone_vae(shapes) or any(k.startswith(PREFIXES["vae"] + "decoder.") for k in shapes)
        text = any(k.startswith(tuple(PREFIXES[g.text] for g in GENERATIONS)) for k in shapes)
        if decoder and not text:
            return "vae"
        raise CheckpointError(_not_sd(shapes), source)

    conv_in = shapes.get(unet + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise CheckpointError(f"UNet without a 4-D input_blocks.0.0.weight (got {conv_in}); the file is "
                              "incomplete or not a Stable Diffusion UNet", source)
    in_channels = conv_in[1]
    label_emb = any(k.startswith(unet + "label_emb.") for k in shapes)
    context = _first(shapes, unet, "attn2.to_k.weight")
    context_width = context[1] if context and len(context) == 2 else None
    proj_in = _first(shapes, unet, "proj_in.weight")

    generation, text_width = _text_encoder(shapes)
    by_width = next((g for g in GENERATIONS if g.context_width == context_width), None)
    by_proj_in = next((g for g in GENERATIONS if proj_in is not None and g.proj_in_rank == len(proj_in)), None)
    if generation is not None:
        if context_width is not None and text_width is not None and context_width != text_width:
            raise CheckpointError(f"inconsistent file: the UNet's cross-attention takes {context_width}-wide "
                                  f"context but the {generation.label} text encoder gives {text_width}", source)
        seen = f"a {generation.label} text encoder"
    elif by_width is not None:
        generation, seen = by_width, f"{context_width}-wide cross-attention"
    elif by_proj_in is not None:
        generation, seen = by_proj_in, "1x1-conv proj_in" if len(proj_in) == 4 else "Linear proj_in"
    else:
        widths = "/".join(str(g.context_width) for g in GENERATIONS)
        raise CheckpointError(f"UNet-only file whose generation cannot be told: cross-attention width "
                              f"{context_width}, proj_in shape {proj_in} (expected {widths}, or a 4-D/2-D "
                              "proj_in)", source)

    rule = next((r for r in RULES if (r.generation, r.in_channels, r.label_emb) ==
                 (generation.name, in_channels, label_emb)), None)
    if rule is None:
        extra = " and label_emb" if label_emb else ""
        known = ", ".join(r.name for r in RULES)
        raise CheckpointError(f"unrecognised model: a UNet with {in_channels} input channels{extra} with "
                              f"{seen} ({generation.label}) matches none of {known}", source)
    return rule.name
