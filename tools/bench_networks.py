"""The models tools/bench.py compares, and the few names every row module shares.

One random checkpoint in an official key layout (`tools/make_checkpoint.py`'s weights) is built into ldm's
networks and, through diffusers' own original-checkpoint converters, into diffusers' (the text tower as
transformers' CLIPTextModel). The row modules (bench.py, bench_load.py, bench_upscale.py) import from here;
this module imports none of them, so the imports stay one-way.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT = "a photograph of an astronaut riding a horse"
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"


# ---------------------------------------------------------------- models and configs
@dataclass(frozen=True)
class Spec:
    """One model to benchmark: its ldm config, the original YAML config (as parsed) for diffusers'
    converters, and the official key layout the random weights are drawn for."""
    name: str
    cfg: object  # models.config.ModelConfig
    original: dict
    layout: dict


def original_config(cfg) -> dict:
    """A ModelConfig as the original YAML config (`v1-inference.yaml`, `v2-inference-v.yaml`, ...), which is
    what diffusers' single-file converters read."""
    from models.config import FAMILIES, CLIPTextConfig
    from models.text_encoders import OFFICIAL_CLIP

    u, v, text = cfg.unet, cfg.vae, cfg.text
    unet = {"in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
            "attention_resolutions": list(u.attention_resolutions), "num_res_blocks": u.num_res_blocks,
            "channel_mult": list(u.channel_mult), "use_spatial_transformer": True,
            "transformer_depth": u.transformer_depth, "context_dim": u.context_dim,
            "use_linear_in_transformer": u.use_linear_in_transformer, "legacy": u.legacy}
    # SD 1 configs name num_heads only, SD 2 configs num_head_channels only; diffusers reads them that way.
    if u.num_heads != -1:
        unet["num_heads"] = u.num_heads
    if u.num_head_channels != -1:
        unet["num_head_channels"] = u.num_head_channels
    if u.num_classes is not None:
        unet["num_classes"] = u.num_classes
    if u.disable_self_attentions is not None:
        unet["disable_self_attentions"] = list(u.disable_self_attentions)
    ddconfig = {"double_z": v.double_z, "z_channels": v.z_channels, "resolution": v.resolution,
                "in_channels": v.in_channels, "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult),
                "num_res_blocks": v.num_res_blocks, "attn_resolutions": list(v.attn_resolutions), "dropout": 0.0}
    # the official towers' names: diffusers builds the text model from s.cfg.text, not from this name
    if isinstance(text, CLIPTextConfig):
        layer = {"layer": "last"} if text.layer == "last" else {"layer": "hidden", "layer_idx": -2}
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"version": OFFICIAL_CLIP, **layer}}
    else:
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"arch": "ViT-H-14", "layer": text.layer, "freeze": True}}
    params = {"linear_start": cfg.linear_start, "linear_end": cfg.linear_end, "timesteps": cfg.timesteps,
              "scale_factor": cfg.scale_factor, "conditioning_key": cfg.conditioning_key,
              "parameterization": cfg.parameterization or "eps",
              "unet_config": {"target": UNET_TARGET, "params": unet},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                     "params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig}},
              "cond_stage_config": cond}
    if "low_scale" in cfg.extra:  # the x4 upscaler's noise augmentation of the low-res image
        params["low_scale_config"] = {"target": "ldm.modules.diffusionmodules.upscaling."
                                                "ImageConcatWithNoiseAugmentation", "params": cfg.extra["low_scale"]}
    target = next(f.target for f in FAMILIES if f.name == cfg.family)  # LatentUpscaleDiffusion, ...
    return {"model": {"target": f"ldm.models.diffusion.ddpm.{target}", "params": params}}


def spec(family: str, tiny: bool, shared: Path) -> Spec:
    """family: "sd1", "sd2v" (SD 2.x 768-v) or "x4_upscaler"."""
    import yaml

    from models.config import PRESETS, from_yaml_dict

    if tiny:
        name = {"sd1": "sd1_tiny", "sd2v": "sd2v_tiny", "x4_upscaler": "x4_upscaler_tiny"}[family]
        folder = shared / "reference" / ("special" if family == "x4_upscaler" else "fixtures") / name
        original = yaml.safe_load((folder / f"{name}.yaml").read_text())
        return Spec(name, from_yaml_dict(original, folder), original,
                    json.loads((folder / f"{name}.layout.json").read_text()))
    cfg = {"sd1": PRESETS["sd1"], "sd2v": replace(PRESETS["sd2"], parameterization="v"),
           "x4_upscaler": PRESETS["x4_upscaler"]}[family]
    layout = {"sd1": "sd1.json", "sd2v": "sd2_768_v.json", "x4_upscaler": "x4_upscaler.json"}[family]
    return Spec(family, cfg, original_config(cfg), json.loads((shared / "reference" / "layouts" / layout).read_text()))


def random_checkpoint(s: Spec, prefix=(), dtype=torch.float32, seed: int = 0) -> dict:
    """Random weights in the official layout, as make_checkpoint writes them; only the keys starting with
    `prefix` (a string or a tuple of them) when one is given."""
    from make_checkpoint import random_state

    keys = {k: v for k, v in s.layout["keys"].items() if not prefix or k.startswith(prefix)}
    return random_state({"keys": keys}, dtype, seed)


def ldm_networks(s: Spec, state: dict) -> dict:
    """ldm's networks on the checkpoint's own tensors (no copy), as ldm.load builds them (the text tower
    from its record: CLIP for SD 1.x, OpenCLIP for the x4 upscaler)."""
    from models.text_encoders import text_encoder
    from models.unet import UNetModel
    from models.vae import AutoencoderKL
    from weights import split_components

    parts = split_components(state).parts
    encoder = text_encoder(s.cfg.text)
    out = {}
    with torch.device("meta"):
        if "unet" in parts:
            out["unet"] = UNetModel(s.cfg.unet)
        if "vae" in parts:
            out["vae"] = AutoencoderKL(s.cfg.vae)
        if encoder.component in parts:
            out["text"] = encoder.module(s.cfg.text)
    states = {"unet": parts.get("unet"), "vae": parts.get("vae"),
              "text": encoder.normalize(parts[encoder.component]) if encoder.component in parts else None}
    for name, module in out.items():
        module.load_state_dict(states[name], strict=True, assign=True)
        module.eval().requires_grad_(False)
    return out


def place_ldm(module, device: torch.device, dtype: torch.dtype, args) -> None:
    """Move an ldm network as ldm.load leaves it: on a CPU, convolutions reorder their weights once per
    input shape and float32 and bfloat16 linear layers run on oneDNN (models/prepack.py), unless --no-prepack. The
    switched layers keep plain weights, so .to() needs nothing undone."""
    from models.prepack import can_prepack, onednn_linears, prepack_convolutions

    module.to(device, dtype)
    if device.type == "cpu" and can_prepack(dtype) and not args.no_prepack:
        prepack_convolutions(module), onednn_linears(module)


def place_both(nets: dict, refs: dict, device: torch.device, dtype: torch.dtype, args) -> None:
    """Both libraries' networks in `dtype` on `device`, ldm's as ldm.load leaves them, before a dtype's rows."""
    for m in refs.values():
        m.to(device, dtype)
    for m in nets.values():
        place_ldm(m, device, dtype, args)
    gc.collect()


def hf_clip_config(text_cfg):
    """transformers' CLIPTextConfig of a CLIP tower (SD 1.x) or of an OpenCLIP one (SD 2.x), as diffusers'
    SD 2 pipelines hold it: a CLIPTextModel whose last_hidden_state is the original's output, so a tower
    read at its penultimate layer is built one block short (the final LayerNorm still applies)."""
    import transformers

    from models.openclip_text import OpenCLIPTextConfig
    from models.tokenizer import END, START

    if isinstance(text_cfg, OpenCLIPTextConfig):
        return transformers.CLIPTextConfig(
            vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.width,
            num_hidden_layers=text_cfg.layers - (text_cfg.layer == "penultimate"),
            num_attention_heads=text_cfg.heads, intermediate_size=int(text_cfg.width * text_cfg.mlp_ratio),
            max_position_embeddings=text_cfg.context_length, hidden_act=text_cfg.act, layer_norm_eps=1e-5,
            bos_token_id=START, eos_token_id=END, pad_token_id=text_cfg.pad_token, projection_dim=text_cfg.embed_dim)
    return transformers.CLIPTextConfig(
        vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.width, num_hidden_layers=text_cfg.layers,
        num_attention_heads=text_cfg.heads, intermediate_size=text_cfg.intermediate_size,
        max_position_embeddings=text_cfg.max_positions, hidden_act=text_cfg.act, layer_norm_eps=1e-5,
        bos_token_id=START, eos_token_id=END, pad_token_id=text_cfg.pad_token, projection_dim=text_cfg.width)


def diffusers_networks(s: Spec, state: dict) -> dict:
    """diffusers' networks (and transformers' CLIP) holding copies of the same weights, converted by
    diffusers' own single-file code."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    out = {}
    if any(k.startswith("model.diffusion_model.") for k in state):
        config = create_unet_diffusers_config_from_ldm(s.original, state)
        out["unet"] = UNet2DConditionModel(**config)
        out["unet"].load_state_dict(convert_ldm_unet_checkpoint(state, config), strict=True)
    if any(k.startswith("first_stage_model.") for k in state):
        config = create_vae_diffusers_config_from_ldm(s.original, state)
        out["vae"] = AutoencoderKL(**config)
        out["vae"].load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=True)
    openclip = any(k.startswith("cond_stage_model.model.") for k in state)
    if openclip or any(k.startswith("cond_stage_model.transformer.") for k in state):
        text = transformers.CLIPTextModel(hf_clip_config(s.cfg.text))
        expected = text.state_dict()
        # OpenCLIP: diffusers' converter splits the fused q/k/v and renames; the unused last block and the
        # text projection are left out (the model above has no place for them)
        converted = convert_open_clip_checkpoint(text, state) if openclip else convert_ldm_clip_checkpoint(state)
        if not hasattr(text, "text_model"):  # transformers >= 5 dropped the level
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        text.load_state_dict({k: v for k, v in converted.items() if k in expected}, strict=True)
        out["text"] = text
    for module in out.values():
        module.eval().requires_grad_(False)
    return out


def write_clip_tokenizer(folder: Path, pad_token_id: Optional[int] = None):
    """An HF CLIPTokenizer from the BPE that open_clip ships (the vocabulary both SD families use), so
    diffusers tokenizes the prompt itself without a download. pad_token_id: the tower's pad token (SD 2's
    OpenCLIP pads with 0, "!", as the hub's SD 2 tokenizers say); None: CLIP's end token, as SD 1's."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): i for k, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    pad = {} if pad_token_id is None else {"pad_token": next(k for k, i in vocab.items() if i == pad_token_id)}
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, **pad)


# ---------------------------------------------------------------- shared by the rows
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_abs_diff(a, b) -> Optional[float]:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return None
    return (a.float() - b.float()).abs().max().item()


def size(args, nominal: int) -> int:
    return nominal // 8 if args.tiny else nominal


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
