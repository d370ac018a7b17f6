"""Which model a checkpoint holds, from its key names and shapes alone.

Shapes are enough: the UNet's first convolution counts the input channels (4 latent, +4 masked
latent +1 mask for inpainting, +1 depth, +3 low-res RGB for the upscaler), the text encoder's
prefix tells CLIP (SD 1.x) from OpenCLIP (SD 2.x), and a file without a text encoder still shows
its generation in the cross-attention width (768 vs 1024) or in `proj_in` (1x1 conv vs Linear).
SD 2 512-base and 768-v share one layout; their parameterisation is not in the weights.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from weights.components import PREFIXES, is_lone_vae
from weights.errors import CheckpointError, PathLike

FAMILIES = ("sd1", "sd1_inpaint", "sd2", "sd2_inpaint", "sd2_depth", "x4_upscaler", "vae")

# (generation, UNet input channels, has label_emb) -> family
_BY_UNET = {
    ("sd1", 4, False): "sd1",
    ("sd1", 9, False): "sd1_inpaint",
    ("sd2", 4, False): "sd2",
    ("sd2", 9, False): "sd2_inpaint",
    ("sd2", 5, False): "sd2_depth",
    ("sd2", 7, True): "x4_upscaler",
}
_GENERATION = {"sd1": "SD 1.x", "sd2": "SD 2.x"}
_CONTEXT_WIDTH = {768: "sd1", 1024: "sd2"}  # CLIP ViT-L/14 and OpenCLIP ViT-H/14 hidden sizes
_PROJ_IN_RANK = {4: "sd1", 2: "sd2"}  # Conv2d 1x1 vs Linear (use_linear_in_transformer)


def _shape(value: Any) -> tuple[int, ...]:
    """A shape from a tensor, a shape, or a (shape, dtype) pair as `read_header` gives."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)):
        return tuple(value[0])
    return tuple(value)


def _first(shapes: Mapping[str, tuple], prefix: str, suffix: str) -> Optional[tuple[int, ...]]:
    return next((s for k, s in shapes.items() if k.startswith(prefix) and k.endswith(suffix)), None)


def _text_encoder(shapes: Mapping[str, tuple]) -> tuple[Optional[str], Optional[int]]:
    """(generation, output width) of the text encoder in the file, (None, None) without one."""
    clip, openclip = PREFIXES["clip_text"], PREFIXES["openclip_text"]
    if any(k.startswith(clip) for k in shapes):
        norm = _first(shapes, clip, "final_layer_norm.weight")  # with or without `text_model.`
        return "sd1", norm[0] if norm else None
    if any(k.startswith(openclip) for k in shapes):
        norm = shapes.get(openclip + "ln_final.weight")
        return "sd2", norm[0] if norm else None
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
        text = any(k.startswith((PREFIXES["clip_text"], PREFIXES["openclip_text"])) for k in shapes)
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

    text_gen, text_width = _text_encoder(shapes)
    if text_gen is not None:
        if context_width is not None and text_width is not None and context_width != text_width:
            raise CheckpointError(f"inconsistent file: the UNet's cross-attention takes {context_width}-wide "
                                  f"context but the {_GENERATION[text_gen]} text encoder gives {text_width}",
                                  source)
        generation, seen = text_gen, f"a {_GENERATION[text_gen]} text encoder"
    elif context_width in _CONTEXT_WIDTH:
        generation, seen = _CONTEXT_WIDTH[context_width], f"{context_width}-wide cross-attention"
    elif proj_in is not None and len(proj_in) in _PROJ_IN_RANK:
        generation = _PROJ_IN_RANK[len(proj_in)]
        seen = "1x1-conv proj_in" if len(proj_in) == 4 else "Linear proj_in"
    else:
        raise CheckpointError(f"UNet-only file whose generation cannot be told: cross-attention width "
                              f"{context_width}, proj_in shape {proj_in} (expected 768/1024, or a 4-D/2-D "
                              "proj_in)", source)

    family = _BY_UNET.get((generation, in_channels, label_emb))
    if family is None:
        extra = " and label_emb" if label_emb else ""
        known = ", ".join(FAMILIES[:-1])
        raise CheckpointError(f"unrecognised model: a UNet with {in_channels} input channels{extra} with "
                              f"{seen} ({_GENERATION[generation]}) matches none of {known}", source)
    return family
