"""What tools/train_tiny.py writes: the checkpoint in the official SD 1.x layout (safetensors, float16, its
recipe and story in the metadata), its YAML in the schema of the original v1-inference.yaml, the text tower's
config.json in the folder the YAML names, and the loss plot (PIL: no matplotlib needed). `r` is
train_tiny's Recipe."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.clip_text import CLIPTextConfig

CLIP_FOLDER = "tiny-clip-text"  # the YAML's `version:`, a folder beside it holding the tower's config.json


def yaml_text(r, scale: float) -> str:
    """The config in the schema of the original configs/stable-diffusion/v1-inference.yaml."""
    u, v = r.unet, r.vae
    ints = lambda xs: "[ " + ", ".join(str(x) for x in xs) + " ]"  # noqa: E731
    return f"""# The built-in model (tools/train_tiny.py): the schema and classes of CompVis' v1-inference.yaml at tiny sizes.
model:
  base_learning_rate: {r.unet_lr:.1e}
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: {r.linear_start}
    linear_end: {r.linear_end}
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: {r.timesteps}
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: {r.size // v.downsampling_factor}
    channels: {v.embed_dim}
    cond_stage_trainable: true
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {scale:.5f}
    use_ema: False
    parameterization: "{r.prediction}"

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: {r.size // v.downsampling_factor} # unused
        in_channels: {u.in_channels}
        out_channels: {u.out_channels}
        model_channels: {u.model_channels}
        attention_resolutions: {ints(u.attention_resolutions)}
        num_res_blocks: {u.num_res_blocks}
        channel_mult: {ints(u.channel_mult)}
        num_heads: {u.num_heads}
        use_spatial_transformer: True
        transformer_depth: {u.transformer_depth}
        context_dim: {u.context_dim}
        use_checkpoint: False
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {v.embed_dim}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: {v.z_channels}
          resolution: {v.resolution}
          in_channels: {v.in_channels}
          out_ch: {v.out_ch}
          ch: {v.ch}
          ch_mult: {ints(v.ch_mult)}
          num_res_blocks: {v.num_res_blocks}
          attn_resolutions: {ints(v.attn_resolutions)}
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {CLIP_FOLDER}  # ./{CLIP_FOLDER}/config.json describes the tower
"""


def clip_config_json(t: CLIPTextConfig) -> dict:
    """The tower as transformers' CLIPTextConfig describes it (what CLIPTextModel.from_pretrained reads)."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": t.vocab_size,
            "hidden_size": t.width, "intermediate_size": t.intermediate_size, "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "max_position_embeddings": t.max_positions, "hidden_act": t.act,
            "layer_norm_eps": 1e-5, "projection_dim": t.width, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1}


def write_model(out: Path, r, unet, vae, text, scale: float, metadata: dict, buffers: dict,
                dtype=torch.float16) -> Path:
    """The run's result as an official SD 1.x file: the three networks under their checkpoint prefixes in `dtype`,
    the DDPM `buffers` (float32, as in the official files), the metadata; the YAML and the text tower's folder
    beside it."""
    from safetensors.torch import save_file

    state = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.transformer.", text)):
        state.update({prefix + k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()})
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(r.text.max_positions)[None]
    state.update(buffers)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".safetensors")
    save_file(state, str(path), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    out.with_suffix(".yaml").write_text(yaml_text(r, scale))
    (out.parent / CLIP_FOLDER).mkdir(exist_ok=True)
    (out.parent / CLIP_FOLDER / "config.json").write_text(json.dumps(clip_config_json(r.text), indent=2) + "\n")
    return path


# ---------------------------------------------------------------- the loss plot (PIL: no matplotlib needed)
def plot_losses(losses: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    panels = [(name, np.asarray(v, dtype=np.float64)) for name, v in losses.items() if len(v)]
    w, h, pad = 520, 240, 44
    img = Image.new("RGB", (w * len(panels), h), "white")
    d = ImageDraw.Draw(img)
    titles = {"vae": "stage 1: autoencoder, L1 + L2 reconstruction", "unet": "stage 3: UNet + text tower, v (or eps) MSE"}
    for p, (name, y) in enumerate(panels):
        x0 = p * w
        k = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        lo, hi = np.log10(max(y.min(), 1e-6)), np.log10(y.max())
        box = (x0 + pad, 24, x0 + w - 12, h - 30)
        d.rectangle(box, outline="black")
        d.text((x0 + pad, 6), titles.get(name, name), fill="black")

        def xy(i, v):
            fx = i / max(1, len(y) - 1)
            fy = (np.log10(max(v, 1e-6)) - lo) / max(hi - lo, 1e-9)
            return box[0] + fx * (box[2] - box[0]), box[3] - fy * (box[3] - box[1])

        step = max(1, len(y) // 800)
        d.line([xy(i, y[i]) for i in range(0, len(y), step)], fill=(190, 200, 230), width=1)
        d.line([xy(i + k - 1, smooth[i]) for i in range(0, len(smooth), step)], fill=(20, 50, 170), width=2)
        for v in sorted({10 ** lo, 10 ** ((lo + hi) / 2), 10 ** hi}):
            _, yy = xy(0, v)
            d.text((x0 + 2, yy - 6), f"{v:.3g}", fill="black")
        d.text((box[0], box[3] + 6), "0", fill="black")
        d.text((box[2] - 50, box[3] + 6), f"{len(y)} steps", fill="black")
        d.text((box[0] + 60, box[3] + 6), "log scale; light: per step, dark: running mean", fill="gray")
    img.save(path)
