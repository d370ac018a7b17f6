"""`ldm.load`: a checkpoint file (+ optional original YAML config) to ready networks, in four stages:
read (file -> flat state dict) -> resolve the config (family, YAML or preset, prediction type) -> build on
`meta` and load strictly -> place (device and dtype, parts deferred to their first call, the prediction
probe, the CPU fast path).

The networks are built on the `meta` device and take the file's tensors with `assign=True`, so a 4 GB
checkpoint is never held twice: a memory-mapped float32 file used in float32 on the CPU is not even copied.
What differs between kinds of text encoder and between families is in their records
(models/text_encoders.py, models/config.py's FAMILIES, weights/families.py's RULES), not here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from models.config import PRESETS, ConfigError, ModelConfig, from_yaml
from models.prepack import can_prepack, onednn_linears, prepack_convolutions
from models.text_encoders import text_encoder
from models.upscaling import ImageConcatWithNoiseAugmentation
from models.tokenizer import Tokenizer, tokenizer_for
from models.unet import UNetModel
from models.vae import AutoencoderKL
from weights import (CheckpointError, detect_family, ema_unet, is_lone_vae, read_checkpoint, schedule_buffers,
                     split_components, sub_state)
from weights.pages import PageReleaser

from .builtin import resolve_checkpoint
from .device import Placement, configure_backends, resolve
from .placing import place


@dataclass
class LatentDiffusion:
    """A loaded model: the three networks and what is needed to sample with them."""
    family: str
    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    tokenizer: Tokenizer
    alphas_cumprod: torch.Tensor  # float32 [1000]: the checkpoint's buffer when it has one
    placement: Placement
    path: Optional[Path] = None
    notes: list = field(default_factory=list)  # what the loader decided and why (shown by the CLI)
    # What the special families condition on besides the text (None elsewhere): the x4 upscaler's
    # noise augmentation of the low-res image (models/upscaling.py), and SD 2 depth's MiDaS estimator,
    # `depth_model(images in [-1, 1]) -> [B, 1, H, W]`, when the file holds its weights.
    low_scale_model: Optional[nn.Module] = None
    depth_model: Optional[nn.Module] = None

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    @property
    def parameterization(self) -> Optional[str]:
        return self.config.parameterization


def find_config(path: Path) -> Optional[Path]:
    """Users keep the original YAML beside the checkpoint with the same stem (v2-1_768-ema-pruned.yaml)."""
    for ext in (".yaml", ".yml"):
        candidate = path.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def _first_few(items: list, n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _load_strict(module: nn.Module, state: dict, what: str, family: str, source: Path) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    # A weight stored as integers (or bool) cannot become a parameter: torch raises deep inside
    # load_state_dict. Name it here instead.
    kind = [f"{k} {str(state[k].dtype).replace('torch.', '')} (expected floating point)"
            for k in expected if k in state and expected[k].is_floating_point() and not state[k].is_floating_point()]
    if missing or unexpected or wrong or kind:
        detail = "; ".join(f"{label} {_first_few(keys)}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                            ("wrong dtype", kind)) if keys)
        advice = ("the file is damaged, download it again" if not (missing or unexpected or wrong) else
                  "check that --config matches this checkpoint (or omit it to detect the family)")
        raise CheckpointError(f"{source.name}: the {what} does not fit the {family} layout: {detail}; {advice}")
    module.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    assert not left, f"{what} tensors never loaded (a buffer built in __init__?): {left[:3]}"


def detect_prediction(unet: nn.Module, context_dim: int) -> tuple[str, float]:
    """Tell an eps model from a v model with one UNet call, as A1111 and stable-diffusion.cpp do for SD 2
    files without a config: at t = 999 with x = 0.5 everywhere, an eps model predicts noise of mean
    about x, a v model about -x0, so mean(out - x) < -1 means v."""
    p = next(unet.parameters())
    x = torch.full((1, unet.cfg.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 77, context_dim), 0.5, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=p.device), context).float()
    score = (out - x[:, :out.shape[1]].float()).mean().item()
    return ("v" if score < -1 else "eps"), score


def sampling_schedule(cfg: ModelConfig, buffers: dict) -> tuple[torch.Tensor, Optional[bool]]:
    """The alphas_cumprod to sample with: the checkpoint's buffer when it has one (what the original
    samples with), else the config's linear schedule; and whether the two agree (None: no buffer)."""
    from samplers.schedule import linear_alphas_cumprod

    computed = linear_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps)
    stored = buffers.get("alphas_cumprod")
    if stored is None:
        return computed, None
    stored = stored.float().clone()
    return stored, stored.shape == computed.shape and (stored - computed).abs().max().item() <= 1e-6


def _vae_state(path: Path) -> dict:
    """A separate VAE file (vae-ft-mse-840000-ema-pruned.ckpt): `encoder.*`, `decoder.*`, ... with or
    without the `first_stage_model.` prefix, `loss.*` keys ignored."""
    state = read_checkpoint(path)
    part = split_components(state).parts.get("vae")
    if not is_lone_vae(state) and not part:
        raise CheckpointError(f"{path.name}: not a VAE file (no encoder/decoder keys)")
    return part


def load(path: Union[str, Path, None] = None, config: Union[str, Path, ModelConfig, None] = None, device=None,
         dtype=None, ema: bool = False, vae: Union[str, Path, None] = None,
         prediction: Optional[str] = None) -> LatentDiffusion:
    """Load an official SD 1.x / 2.x checkpoint (.ckpt or .safetensors).

    path: the file; "builtin" is the built-in model (ldm/builtin.py); None is the original scripts' default
    models/ldm/stable-diffusion-v1/model.ckpt when it exists, else the built-in model (with a note).

    config: an original YAML (`v1-inference.yaml`), a ModelConfig, or None to detect the family from the
    file's keys (a YAML beside the checkpoint with the same stem is used when present).
    device/dtype: a Placement, or for `ldm.device.resolve` a device (`"cuda"`, `torch.device("cpu")`) and a
    dtype (`"bf16"`, `torch.float16`); None: auto.
    ema: use the EMA copy of the UNet (`model_ema.*`) that full training checkpoints carry.
    vae: a separate VAE file to use instead of the checkpoint's own.
    prediction: "eps" or "v", overriding the config; SD 2 files without either are probed."""
    path, note = resolve_checkpoint(path)
    placement = device if isinstance(device, Placement) else resolve(device, dtype)
    notes = list(placement.notes) + ([note] if note else [])
    configure_backends(placement)
    if prediction not in (None, "eps", "v"):  # before a 4 GB read
        raise ConfigError(f"prediction must be eps or v, got {prediction!r}")
    state = _read(path)
    family, cfg = resolve_config(path, state, config, prediction, notes)
    unet, autoencoder, text, vae_path = build(path, state, family, cfg, ema, vae, notes)
    unet, autoencoder, text, cfg = place_all(unet, autoencoder, text, cfg, placement, path, vae_path, notes)
    alphas_cumprod, agree = sampling_schedule(cfg, schedule_buffers(state))
    if agree is False:
        notes.append("the checkpoint's alphas_cumprod differs from the config's linear schedule; "
                     "sampling with the checkpoint's, as the original does")
    low_scale = low_scale_model(cfg, state, family, path, notes)
    depth = depth_model(state, family, placement, path, notes)
    return LatentDiffusion(
        family=family, config=cfg, unet=unet, vae=autoencoder, text_encoder=text,
        tokenizer=tokenizer_for(cfg.text), alphas_cumprod=alphas_cumprod, placement=placement, path=path,
        notes=notes, low_scale_model=low_scale, depth_model=depth)


def low_scale_model(cfg: ModelConfig, state: dict, family: str, path: Path,
                    notes: list) -> Optional[ImageConcatWithNoiseAugmentation]:
    """The x4 upscaler's noise augmentation: built from the config, its schedule buffers then taken from the
    file's `low_scale_model.*` (strictly) when it has them. float32 on the CPU: a small table, indexed there."""
    if "low_scale" not in cfg.extra:
        return None
    try:
        module = ImageConcatWithNoiseAugmentation.from_config(cfg.extra["low_scale"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: the config's low_scale_config cannot be used: {e}") from None
    buffers = sub_state(state, "low_scale_model.")
    if buffers:
        _load_strict(module, {k: v.float() for k, v in buffers.items()}, "low-res noise schedule", family, path)
    else:
        notes.append("the file has no low_scale_model.* buffers; the low-res noise schedule is computed from the "
                     "config")
    return module


def depth_model(state: dict, family: str, placement: Placement, path: Path, notes: list) -> Optional[nn.Module]:
    """SD 2 depth's MiDaS DPT-Hybrid from the file's `depth_model.*` keys (strictly), placed like the other
    networks; None, with a note, when the file does not carry them (pass a depth map instead)."""
    if family != "sd2_depth":
        return None
    weights = sub_state(state, "depth_model.")
    if not weights:
        notes.append("the file has no depth_model.* weights (MiDaS): depth comes from --depth-map only")
        return None
    from models.midas import MiDaSInference

    with torch.device("meta"):
        module = MiDaSInference()
    _load_strict(module, weights, "depth model (MiDaS)", family, path)
    return place(module, placement, PageReleaser(path))


def _read(path: Path) -> dict:
    """Stage 1: the file as one flat {key: tensor} dict (memory-mapped where the format allows)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    return read_checkpoint(path)


def resolve_config(path: Path, state: dict, config, prediction: Optional[str], notes: list) -> tuple[str, ModelConfig]:
    """Stage 2: the family the tensors show, and the config to build it with: the one given, the YAML beside
    the checkpoint, or the family's preset; `prediction` overrides its parameterization."""
    if config is None and (beside := find_config(path)) is not None:
        config, _ = beside, notes.append(f"using the config beside the checkpoint: {beside.name}")
    family = detect_family({k: tuple(v.shape) for k, v in state.items()}, source=path)
    if family == "vae":
        raise CheckpointError(f"{path.name}: this is a VAE-only file; load a full model checkpoint "
                              "and pass this file as the separate VAE (vae=..., --vae)")
    if config is None:
        cfg = PRESETS[family]
    else:
        try:
            cfg = config if isinstance(config, ModelConfig) else from_yaml(config)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        if cfg.family != family:
            raise CheckpointError(f"{path.name} is a {family} checkpoint but the config describes {cfg.family}; "
                                  "pass the config that belongs to this file, or none to use the built-in one")
    if prediction is not None:
        if cfg.parameterization not in (None, prediction):
            notes.append(f"the config says the model predicts {cfg.parameterization}; using {prediction} as asked "
                         "(--prediction)")
        cfg = replace(cfg, parameterization=prediction)
    return family, cfg


def build(path: Path, state: dict, family: str, cfg: ModelConfig, ema: bool, vae, notes: list):
    """Stage 3: the three networks built on `meta`, each given its tensors strictly (the UNet's EMA copy and
    a separate VAE file on request). Returns (unet, vae, text encoder, the VAE's file)."""
    parts = split_components(state).parts
    encoder = text_encoder(cfg.text)
    for needed in ("unet", "vae", encoder.component):
        if not parts.get(needed) and not (needed == "vae" and vae is not None):
            raise CheckpointError(f"{path.name}: no {needed} weights in this file; it is not a complete "
                                  f"{family} checkpoint")
    with torch.device("meta"):
        unet = UNetModel(cfg.unet)
        autoencoder = AutoencoderKL(cfg.vae)
        text = encoder.module(cfg.text)
    unet_state = parts["unet"]
    if ema:
        unet_state = ema_unet(state, list(unet.state_dict()), source=path)
        notes.append("using the EMA weights of the UNet (model_ema.*)")
    vae_state, vae_path = parts.get("vae"), path
    if vae is not None:
        vae_path = Path(vae)
        vae_state = _vae_state(vae_path)
        notes.append(f"using the VAE from {vae_path.name}")
    _load_strict(unet, unet_state, "UNet", family, path)
    _load_strict(autoencoder, vae_state, "VAE", family, vae_path)
    _load_strict(text, encoder.normalize(parts[encoder.component]), "text encoder", family, path)
    return unet, autoencoder, text, vae_path


def place_all(unet, autoencoder, text, cfg: ModelConfig, placement: Placement, path: Path, vae_path: Path,
              notes: list):
    """Stage 4: the networks on the compute device and dtype (parts a command may never run on their first
    call), the prediction type probed when no config says it, then the CPU fast path. Returns the networks
    and the config with its parameterization known."""
    release = PageReleaser(path)
    release_vae = release if vae_path == path else PageReleaser(vae_path)
    unet, text = place(unet, placement, release), place(text, placement, release, later=text.skipped_blocks())
    autoencoder = place(autoencoder, placement, release_vae, later=(autoencoder.encoder, autoencoder.quant_conv))
    if cfg.parameterization is None:
        kind, score = detect_prediction(unet, cfg.unet.context_dim)
        cfg = replace(cfg, parameterization=kind)
        notes.append(f"prediction type {kind} (no config says; one UNet call at t=999 gave mean(out - x) = "
                     f"{score:.2f}, {'<' if kind == 'v' else '>='} -1); override with --prediction")
    if placement.device.type == "cpu" and can_prepack(placement.dtype):  # after the probe's odd 8x8 shape
        prepack_convolutions(unet), prepack_convolutions(autoencoder)
        onednn_linears(unet), onednn_linears(text)
    return unet, autoencoder, text, cfg
