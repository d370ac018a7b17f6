"""Splitting a flat checkpoint into its networks by key prefix.

An official file is one `LatentDiffusion.state_dict()`: each network sits under one prefix, so a
component is just "the keys under that prefix, with the prefix removed", ready for
`load_state_dict(strict=True)` on a model that mirrors the official names. Keys that official
files carry but inference does not use are recognised (`extras`) so that anything else
(`unknown`) stands out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from torch import Tensor

from weights.errors import CheckpointError, PathLike

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_text": "cond_stage_model.transformer.",  # SD 1.x: transformers' CLIPTextModel
    "openclip_text": "cond_stage_model.model.",  # SD 2.x: open_clip's text tower
}

# DDPM.register_schedule's buffers: recomputed by the sampler, but kept so the schedule can be checked.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
EXTRA_KEYS = frozenset(SCHEDULE_BUFFERS) | {
    "logvar", "lvlb_weights",
    # arange(77): persistent in transformers <= 4.30 only, so present or not depending on who saved
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
}
EXTRA_PREFIXES = (
    "model_ema.",  # LitEma shadow weights (and its decay / num_updates)
    "depth_model.",  # SD 2 depth: the MiDaS estimator (loaded by ldm.loading when present: `sub_state`)
    "low_scale_model.",  # x4 upscaler: the noise-augmentation schedule (likewise)
    "loss.", "first_stage_model.loss.",  # VAE training losses (LPIPS, discriminator)
)
# A VAE saved on its own (vae-ft-mse-840000-ema-pruned.ckpt) has AutoencoderKL's keys unprefixed.
VAE_FILE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
EMA_PREFIX = "model_ema."


@dataclass(frozen=True)
class Components:
    parts: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # name -> {key without prefix: tensor}
    extras: dict[str, Tensor] = field(default_factory=dict)  # recognised, unused by inference
    unknown: list[str] = field(default_factory=list)


def is_extra(key: str) -> bool:
    return key in EXTRA_KEYS or key.startswith(EXTRA_PREFIXES)


def is_lone_vae(keys: Iterable[str]) -> bool:
    """Keys of a separately published VAE without the `first_stage_model.` prefix."""
    keys = list(keys)
    if any(k.startswith(tuple(PREFIXES.values())) for k in keys):
        return False
    return any(k.startswith("decoder.") for k in keys)


def split_components(sd: Mapping[str, Tensor]) -> Components:
    """Group a flat state dict into `parts` (prefix stripped), `extras` and `unknown` keys."""
    lone_vae = is_lone_vae(sd)
    parts: dict[str, dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        if is_extra(key):  # before the prefixes: position_ids and first_stage_model.loss sit under them
            extras[key] = tensor
        elif lone_vae and key.startswith(VAE_FILE_PREFIXES):
            parts.setdefault("vae", {})[key] = tensor
        else:
            name = next((n for n, p in PREFIXES.items() if key.startswith(p)), None)
            if name is None:
                unknown.append(key)
            else:
                parts.setdefault(name, {})[key[len(PREFIXES[name]):]] = tensor
    return Components(parts, extras, unknown)


def sub_state(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The keys under `prefix` with it removed: one of the `extras` networks inference may still run
    (`depth_model.`: SD 2 depth's MiDaS; `low_scale_model.`: the x4 upscaler's noise schedule)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def schedule_buffers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The DDPM schedule buffers the file carries (betas, alphas_cumprod, ...), by name."""
    return {name: sd[name] for name in SCHEDULE_BUFFERS if name in sd}


def ema_name(unet_key: str) -> str:
    """LitEma's buffer name for a UNet parameter: the DiffusionWrapper name with every dot removed."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def has_ema(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(EMA_PREFIX + "diffusion_model") for k in sd)


def ema_unet(sd: Mapping[str, Tensor], unet_keys: Iterable[str],
             source: Optional[PathLike] = None) -> dict[str, Tensor]:
    """The EMA copy of the UNet, under the UNet's own key names (prefix stripped).

    LitEma's names drop the dots, so they cannot be parsed back; the mapping is built from the
    names the UNet expects instead. `source` names the file in error messages.
    """
    by_ema: dict[str, str] = {}
    for key in unet_keys:
        name = ema_name(key)
        if name in by_ema:
            raise ValueError(f"UNet keys {by_ema[name]!r} and {key!r} share the EMA name {name!r}")
        by_ema[name] = key
    if not any(name in sd for name in by_ema):
        raise CheckpointError("has no EMA weights (no model_ema.diffusion_model* keys; pruned and "
                              "'emaonly' files keep only one copy); run without --ema", source)
    missing = [name for name in by_ema if name not in sd]
    if missing:
        raise CheckpointError(f"EMA weights incomplete: {len(missing)} of {len(by_ema)} UNet tensors "
                              f"missing (first: {missing[0]}); run without --ema", source)
    return {key: sd[name] for name, key in by_ema.items()}
