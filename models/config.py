"""Network configurations: frozen dataclasses, one record per checkpoint family, and the original YAML reader.

A config is a plain value. Presets are built with `dataclasses.replace`, never by mutating a global.
Field names follow the original YAML (`unet_config.params`, `ddconfig`, ...) so reading a config is a
copy, not a translation.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

# The text towers' configs live beside their modules (models/text_encoders.py has their records); they are
# imported here too so that every network's config can be had from this module.
from models.clip_text import CLIPTextConfig  # noqa: F401
from models.errors import ConfigError
from models.openclip_text import OpenCLIPTextConfig  # noqa: F401
from models.text_encoders import CLIP_L, OPENCLIP_H, TextConfig, text_config


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


# ---------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """One checkpoint family: the original's model class that its YAML names, and the built-in config a
    file of this family gets without one. What it conditions on is in that preset: `conditioning_key`
    (crossattn; hybrid: also channels concatenated to the latent, the UNet's in_channels beyond 4;
    hybrid-adm: also a class label, `num_classes`). How a file of the family is recognised from its
    tensors is the rule of the same name in weights/families.py (weights knows no model class)."""
    target: str  # LatentDiffusion, LatentInpaintDiffusion, ...
    preset: ModelConfig

    @property
    def name(self) -> str:
        return self.preset.family


_SD1_UNET = UNetConfig(num_heads=8)
_SD2_UNET = replace(_SD1_UNET, num_heads=-1, num_head_channels=64, context_dim=1024,
                    use_linear_in_transformer=True)
_VAE = VAEConfig()

FAMILIES = (
    Family("LatentDiffusion", ModelConfig("sd1", _SD1_UNET, _VAE, CLIP_L)),
    Family("LatentInpaintDiffusion", ModelConfig("sd1_inpaint", replace(_SD1_UNET, in_channels=9), _VAE, CLIP_L,
                                                 conditioning_key="hybrid")),
    # 512-base (eps) and 768-v (v) share one layout; parameterization comes from the config or a probe.
    Family("LatentDiffusion", ModelConfig("sd2", _SD2_UNET, _VAE, OPENCLIP_H, parameterization=None)),
    Family("LatentInpaintDiffusion", ModelConfig("sd2_inpaint", replace(_SD2_UNET, in_channels=9), _VAE, OPENCLIP_H,
                                                 conditioning_key="hybrid")),
    Family("LatentDepth2ImageDiffusion", ModelConfig("sd2_depth", replace(_SD2_UNET, in_channels=5), _VAE,
                                                     OPENCLIP_H, conditioning_key="hybrid")),
    Family("LatentUpscaleDiffusion", ModelConfig(
        "x4_upscaler",
        UNetConfig(in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), attention_resolutions=(2, 4, 8),
                   num_heads=8, context_dim=1024, use_linear_in_transformer=True, num_classes=1000,
                   disable_self_attentions=(True, True, True, False)),
        VAEConfig(ch_mult=(1, 2, 4)), OPENCLIP_H, scale_factor=0.08333, parameterization="v",
        linear_start=0.0001, linear_end=0.02, conditioning_key="hybrid-adm",
        extra={"low_scale": {"noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02},
                             "max_noise_level": 350}},
    )),
)
PRESETS: dict[str, ModelConfig] = {f.name: f.preset for f in FAMILIES}


# ---------------------------------------------------------------- the original YAML configs
def _fields(cls, params: dict) -> dict:
    known = {f for f in cls.__dataclass_fields__}
    out = {}
    for k, v in params.items():
        if k in known:
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


def _family(target: str, text: TextConfig) -> str:
    kind = type(text)
    family = next((f.name for f in FAMILIES if f.target == target and isinstance(f.preset.text, kind)), None)
    if family is None:
        raise ConfigError(f"model target {target} with a {kind.__name__.replace('Config', '')} encoder is not a "
                          "known family")
    return family


def from_yaml_dict(doc: dict, folder: Union[str, Path, None] = None) -> ModelConfig:
    """Read an original `configs/stable-diffusion/*.yaml` (already parsed) into a ModelConfig.

    `folder` is where the YAML lives: the text towers it names are described by files there (see
    models/text_encoders.py). None: only the official towers (and open_clip's registry) are known."""
    try:
        model = doc["model"]
        params = model["params"]
        unet_params = params["unet_config"]["params"]
        first = params["first_stage_config"]["params"]
        cond = params["cond_stage_config"]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"not a latent diffusion config: missing model.params...{e}") from None
    text = text_config(cond, Path(folder) if folder is not None else None)
    family = _family(model.get("target", "LatentDiffusion").rsplit(".", 1)[-1], text)
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
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a YAML text file (not UTF-8); pass the original config (.yaml)") from None
    return from_yaml_dict(doc, path.parent)
