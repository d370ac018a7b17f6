"""Network configurations: frozen dataclasses, presets per checkpoint family, and the original YAML reader.

A config is a plain value. Presets are built with `dataclasses.replace`, never by mutating a global.
Field names follow the original YAML (`unet_config.params`, `ddconfig`, ...) so reading a config is a
copy, not a translation.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a transformer
    num_heads: int = -1  # used when num_head_channels == -1 (SD 1.x: 8)
    num_head_channels: int = -1  # SD 2.x: 64, heads = channels // 64
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    num_classes: Optional[int] = None  # x4 upscaler: the noise level is a class label
    disable_self_attentions: Optional[tuple[bool, ...]] = None  # per level: attn1 attends to the context
    legacy: bool = False

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        """Number of attention heads and head width at a level with `channels` channels (openaimodel.py)."""
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, channels // self.num_heads
        else:
            heads, dim_head = channels // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = channels // heads
        return heads, dim_head


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL: `embed_dim` plus the `ddconfig` of the original config."""
    embed_dim: int = 4
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    double_z: bool = True

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower in the Hugging Face layout (SD 1.x's FrozenCLIPEmbedder)."""
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 77
    act: str = "quick_gelu"
    layer: str = "last"  # "last" or "penultimate" (clip skip 2)
    pad_token: int = 49407  # <|endoftext|>


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """OpenCLIP text tower in the open_clip layout (SD 2.x's FrozenOpenCLIPEmbedder)."""
    vocab_size: int = 49408
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    context_length: int = 77
    embed_dim: int = 1024  # text_projection output; stored in checkpoints, unused by SD 2.x
    act: str = "gelu"
    layer: str = "penultimate"  # SD 2.x runs all but the last block, then ln_final
    pad_token: int = 0


TextConfig = Union[CLIPTextConfig, OpenCLIPTextConfig]


@dataclass(frozen=True)
class ModelConfig:
    """One latent diffusion model: its three networks plus the diffusion settings around them."""
    family: str
    unet: UNetConfig
    vae: VAEConfig
    text: TextConfig
    scale_factor: float = 0.18215
    parameterization: Optional[str] = "eps"  # "eps" or "v"; None: not known (SD 2 without a config)
    linear_start: float = 0.00085
    linear_end: float = 0.0120
    timesteps: int = 1000
    conditioning_key: str = "crossattn"
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # noise_level, low-res schedule...


# ---------------------------------------------------------------- presets
CLIP_L = CLIPTextConfig()
OPENCLIP_H = OpenCLIPTextConfig()
# Text towers named in configs. The reference fixtures' harness registers two tiny towers under
# these names, the way open_clip registers `ViT-H-14` from a JSON file of its own.
TEXT_BY_NAME: dict[str, TextConfig] = {
    "openai/clip-vit-large-patch14": CLIP_L,
    "ViT-H-14": OPENCLIP_H,
    "oracle/tiny-clip-text": CLIPTextConfig(width=32, layers=2, heads=2, intermediate_size=64),
    "oracle-tiny-text": OpenCLIPTextConfig(width=32, layers=2, heads=2, embed_dim=32),
}

_SD1_UNET = UNetConfig(num_heads=8)
_SD2_UNET = replace(_SD1_UNET, num_heads=-1, num_head_channels=64, context_dim=1024,
                    use_linear_in_transformer=True)
_VAE = VAEConfig()

PRESETS: dict[str, ModelConfig] = {
    "sd1": ModelConfig("sd1", _SD1_UNET, _VAE, CLIP_L),
    "sd1_inpaint": ModelConfig("sd1_inpaint", replace(_SD1_UNET, in_channels=9), _VAE, CLIP_L,
                               conditioning_key="hybrid"),
    # 512-base (eps) and 768-v (v) share one layout; parameterization comes from the config or a probe.
    "sd2": ModelConfig("sd2", _SD2_UNET, _VAE, OPENCLIP_H, parameterization=None),
    "sd2_inpaint": ModelConfig("sd2_inpaint", replace(_SD2_UNET, in_channels=9), _VAE, OPENCLIP_H,
                               conditioning_key="hybrid"),
    "sd2_depth": ModelConfig("sd2_depth", replace(_SD2_UNET, in_channels=5), _VAE, OPENCLIP_H,
                             conditioning_key="hybrid"),
    "x4_upscaler": ModelConfig(
        "x4_upscaler",
        UNetConfig(in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), attention_resolutions=(2, 4, 8),
                   num_heads=8, context_dim=1024, use_linear_in_transformer=True, num_classes=1000,
                   disable_self_attentions=(True, True, True, False)),
        VAEConfig(ch_mult=(1, 2, 4)), OPENCLIP_H, scale_factor=0.08333, parameterization="v",
        linear_start=0.0001, linear_end=0.02, conditioning_key="hybrid-adm",
        extra={"low_scale": {"noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02},
                             "max_noise_level": 350}},
    ),
}


# ---------------------------------------------------------------- the original YAML configs
_TARGET_FAMILY = {
    ("LatentDiffusion", "clip"): "sd1",
    ("LatentInpaintDiffusion", "clip"): "sd1_inpaint",
    ("LatentDiffusion", "openclip"): "sd2",
    ("LatentInpaintDiffusion", "openclip"): "sd2_inpaint",
    ("LatentDepth2ImageDiffusion", "openclip"): "sd2_depth",
    ("LatentUpscaleDiffusion", "openclip"): "x4_upscaler",
}


class ConfigError(ValueError):
    """A config file that cannot describe a model we can build."""


def _fields(cls, params: dict) -> dict:
    known = {f for f in cls.__dataclass_fields__}
    out = {}
    for k, v in params.items():
        if k in known:
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


def _text_config(cond: dict) -> TextConfig:
    target = cond.get("target", "").rsplit(".", 1)[-1]
    params = cond.get("params") or {}
    if target == "FrozenCLIPEmbedder":
        name = params.get("version", "openai/clip-vit-large-patch14")
        base = TEXT_BY_NAME.get(name)
        if not isinstance(base, CLIPTextConfig):
            raise ConfigError(f"unknown CLIP text model {name!r}; known: openai/clip-vit-large-patch14")
        layer = params.get("layer", "last")
        if layer == "hidden" and params.get("layer_idx") == -2:
            layer = "penultimate"
        if layer not in ("last", "penultimate"):
            raise ConfigError(f"CLIP text layer {layer!r} is not supported (last, penultimate)")
        return replace(base, layer=layer)
    if target == "FrozenOpenCLIPEmbedder":
        name = params.get("arch", "ViT-H-14")
        base = TEXT_BY_NAME.get(name)
        if not isinstance(base, OpenCLIPTextConfig):
            raise ConfigError(f"unknown OpenCLIP text model {name!r}; known: ViT-H-14")
        layer = params.get("layer", "last")
        if layer not in ("last", "penultimate"):
            raise ConfigError(f"OpenCLIP text layer {layer!r} is not supported (last, penultimate)")
        return replace(base, layer=layer)
    raise ConfigError(f"cond_stage_config target {cond.get('target')!r} is not a text encoder ldm knows "
                      "(FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder)")


def from_yaml_dict(doc: dict) -> ModelConfig:
    """Read an original `configs/stable-diffusion/*.yaml` (already parsed) into a ModelConfig."""
    try:
        model = doc["model"]
        params = model["params"]
        unet_params = params["unet_config"]["params"]
        first = params["first_stage_config"]["params"]
        cond = params["cond_stage_config"]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"not a latent diffusion config: missing model.params...{e}") from None
    text = _text_config(cond)
    kind = "clip" if isinstance(text, CLIPTextConfig) else "openclip"
    target = model.get("target", "LatentDiffusion").rsplit(".", 1)[-1]
    family = _TARGET_FAMILY.get((target, kind))
    if family is None:
        raise ConfigError(f"model target {target} with a {kind} text encoder is not a known family")
    # `use_fp16` is a hint for the original code (it casts the UNet input to half and dies on a CPU);
    # here the device policy decides the dtype, so it is ignored on purpose.
    unet = UNetConfig(**_fields(UNetConfig, unet_params))
    vae = VAEConfig(embed_dim=first.get("embed_dim", 4), **_fields(VAEConfig, first.get("ddconfig", {})))
    extra = {}
    if "low_scale_config" in params:
        # ImageConcatWithNoiseAugmentation: its own schedule for noising the low-resolution image
        extra["low_scale"] = dict(params["low_scale_config"].get("params") or {})
    return ModelConfig(
        family=family, unet=unet, vae=vae, text=text,
        scale_factor=float(params.get("scale_factor", 1.0)),
        parameterization=params.get("parameterization", "eps"),
        linear_start=float(params.get("linear_start", 0.00085)),
        linear_end=float(params.get("linear_end", 0.012)),
        timesteps=int(params.get("timesteps", 1000)),
        conditioning_key=params.get("conditioning_key", "crossattn"),
        extra=extra,
    )


def from_yaml(path: Union[str, Path]) -> ModelConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return from_yaml_dict(doc)
