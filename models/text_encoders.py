"""One record per kind of text encoder: everything ldm needs to know about it, in one place.

A record says which network (module and config class) a config's `cond_stage_config` target builds, under
which component of the checkpoint its weights sit (weights.components.PREFIXES), how the variants of its
state dict in circulation are normalised, and how the tower a config names is found. A new kind of text
encoder is one record here and one module beside this file, plus, on the checkpoint side (weights knows no
model class), its key prefix in weights/components.py's PREFIXES and, if it starts a generation of models,
a `Generation` in weights/families.py. The tokenizer follows its config (pad token, context length).

Towers are found from files, the way the original code finds them, never from a table of names:
- FrozenCLIPEmbedder `version: X`: `CLIPTextModel.from_pretrained(X)` reads `X/config.json`, so a folder X
  beside the YAML holding that file describes the tower. The official `openai/clip-vit-large-patch14`
  needs no folder.
- FrozenOpenCLIPEmbedder `arch: X`: `open_clip.create_model(X)` reads the model config X, registered from
  `X.json` (open_clip.add_model_config) or shipped in open_clip's own `model_configs/X.json`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

from torch import nn

from models.clip_text import CLIPTextConfig, CLIPTextModel, normalize_clip_keys
from models.errors import ConfigError
from models.openclip_text import OpenCLIPTextConfig, OpenCLIPTextModel, normalize_openclip_keys
from models.tokenizer import open_clip_folder

TextConfig = Union[CLIPTextConfig, OpenCLIPTextConfig]
CLIP_L = CLIPTextConfig()  # openai/clip-vit-large-patch14's text tower (SD 1.x)
OPENCLIP_H = OpenCLIPTextConfig()  # open_clip ViT-H-14's text tower (SD 2.x)


@dataclass(frozen=True)
class TextEncoder:
    target: str  # the cond_stage_config class of the original code
    component: str  # its component in weights.components.PREFIXES
    config: type
    module: Callable[[TextConfig], nn.Module]
    normalize: Callable[[dict], dict]  # state-dict variants in circulation -> the module's keys
    from_params: Callable[[dict, Optional[Path]], TextConfig]  # cond_stage_config.params, YAML folder -> config
    default: TextConfig  # what a checkpoint without a config gets (the family presets)


# ---------------------------------------------------------------- SD 1.x: transformers' CLIPTextModel
OFFICIAL_CLIP = "openai/clip-vit-large-patch14"
# transformers.CLIPTextConfig's defaults: what from_pretrained assumes for a key config.json leaves out
_HF_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}


def clip_from_hf_config(doc: dict) -> CLIPTextConfig:
    """A Hugging Face `config.json` of a CLIPTextModel (or of a whole CLIPModel, whose `text_config` it
    reads, as CLIPTextConfig.from_pretrained does)."""
    if doc.get("model_type") == "clip":
        doc = doc.get("text_config") or {}
    c = {**_HF_DEFAULTS, **doc}
    return CLIPTextConfig(vocab_size=c["vocab_size"], width=c["hidden_size"], layers=c["num_hidden_layers"],
                          heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                          max_positions=c["max_position_embeddings"], act=c["hidden_act"])


def _clip_layer(params: dict) -> str:
    layer = params.get("layer", "last")
    if layer == "hidden" and params.get("layer_idx") == -2:
        layer = "penultimate"
    if layer not in ("last", "penultimate"):
        raise ConfigError(f"CLIP text layer {layer!r} is not supported (last, penultimate)")
    return layer


def _clip_from_params(params: dict, folder: Optional[Path]) -> CLIPTextConfig:
    name = params.get("version") or OFFICIAL_CLIP
    described = folder / name / "config.json" if folder is not None else None
    if described is not None and described.is_file():
        cfg = clip_from_hf_config(_read_json(described))
    elif name == OFFICIAL_CLIP:
        cfg = CLIP_L
    else:
        where = described or Path(name) / "config.json"
        raise ConfigError(f"unknown CLIP text tower {name!r}: no {where}; put the tower's Hugging Face config.json "
                          "(what CLIPTextModel.from_pretrained reads) there")
    return replace(cfg, layer=_clip_layer(params))


# ---------------------------------------------------------------- SD 2.x: open_clip's text tower
# text_cfg options that change the network; a tower that sets them is one this module does not build
_UNBUILT = ("hf_model_name", "ls_init_value", "embed_cls", "no_causal_mask", "proj_bias", "qk_norm",
            "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "act_kwargs",
            "norm_kwargs")


def open_clip_model_config(name: str, folder: Optional[Path] = None) -> Optional[dict]:
    """The open_clip model config `name`: `name.json` in `folder` (as open_clip.add_model_config registers
    it), else open_clip's own registry (what open_clip.get_model_config returns), else None. The registry
    is read from the installed package's model_configs/ without importing open_clip."""
    for path in ([folder / f"{name}.json"] if folder is not None else []) + [open_clip_folder() / "model_configs"
                                                                             / f"{name}.json"]:
        if path.is_file():
            doc = _read_json(path)
            if all(k in doc for k in ("embed_dim", "vision_cfg", "text_cfg")):  # open_clip's own test
                return doc
    return None


def openclip_from_model_config(doc: dict) -> OpenCLIPTextConfig:
    """An open_clip model config (`ViT-H-14.json`): its `text_cfg`, defaults as open_clip.CLIPTextCfg's."""
    text = doc["text_cfg"]
    unbuilt = [k for k in _UNBUILT if text.get(k)] + (["proj_type"] if text.get("proj_type", "linear") != "linear"
                                                      else [])
    if unbuilt:
        raise ConfigError(f"the open_clip text tower sets {', '.join(unbuilt)}, which ldm's OpenCLIP text model "
                          "does not build")
    return OpenCLIPTextConfig(vocab_size=text.get("vocab_size", 49408), width=text.get("width", 512),
                              layers=text.get("layers", 12), heads=text.get("heads", 8),
                              mlp_ratio=float(text.get("mlp_ratio", 4.0)),
                              context_length=text.get("context_length", 77), embed_dim=doc["embed_dim"],
                              act="quick_gelu" if doc.get("quick_gelu") else "gelu")


def _openclip_from_params(params: dict, folder: Optional[Path]) -> OpenCLIPTextConfig:
    name = params.get("arch") or "ViT-H-14"
    doc = open_clip_model_config(name, folder)
    if doc is None:
        beside = folder / f"{name}.json" if folder is not None else Path(f"{name}.json")
        raise ConfigError(f"unknown OpenCLIP text tower {name!r}: neither {beside} nor open_clip's "
                          f"model_configs/{name}.json exists; put the tower's open_clip model config there")
    layer = params.get("layer", "last")
    if layer not in ("last", "penultimate"):
        raise ConfigError(f"OpenCLIP text layer {layer!r} is not supported (last, penultimate)")
    return replace(openclip_from_model_config(doc), layer=layer)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable JSON file: {e}") from None


# ---------------------------------------------------------------- the records
TEXT_ENCODERS = (
    TextEncoder("FrozenCLIPEmbedder", "clip_text", CLIPTextConfig, CLIPTextModel, normalize_clip_keys,
                _clip_from_params, CLIP_L),
    TextEncoder("FrozenOpenCLIPEmbedder", "openclip_text", OpenCLIPTextConfig, OpenCLIPTextModel,
                normalize_openclip_keys, _openclip_from_params, OPENCLIP_H),
)


def text_encoder(cfg: TextConfig) -> TextEncoder:
    """The record of a text config."""
    return next(e for e in TEXT_ENCODERS if isinstance(cfg, e.config))


def text_config(cond: dict, folder: Optional[Path]) -> TextConfig:
    """A `cond_stage_config` of an original YAML, whose tower files are looked for in `folder`."""
    target = (cond.get("target") or "").rsplit(".", 1)[-1]
    encoder = next((e for e in TEXT_ENCODERS if e.target == target), None)
    if encoder is None:
        known = ", ".join(e.target for e in TEXT_ENCODERS)
        raise ConfigError(f"cond_stage_config target {cond.get('target')!r} is not a text encoder ldm knows ({known})")
    return encoder.from_params(cond.get("params") or {}, folder)
