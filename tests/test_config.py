"""The built-in presets equal what the official YAML configs describe, and the reader takes their schema.

The YAML below is the model part of the original repositories' configs (CompVis v1-inference.yaml,
runwayml v1-inpainting-inference.yaml, Stability v2-inference(-v).yaml, v2-inpainting-inference.yaml,
v2-midas-inference.yaml, x4-upscaling.yaml), training-only sections left out.
"""
from dataclasses import replace

import pytest
import yaml

from conftest import FIXTURES
from models.config import PRESETS, ConfigError, from_yaml, from_yaml_dict

VAE = """
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 128,
                   ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}
        lossconfig: {target: torch.nn.Identity}
"""
SD1_UNET = """
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 32, in_channels: IN, out_channels: 4, model_channels: 320, attention_resolutions: [4, 2, 1],
               num_res_blocks: 2, channel_mult: [1, 2, 4, 4], num_heads: 8, use_spatial_transformer: True,
               transformer_depth: 1, context_dim: 768, use_checkpoint: True, legacy: False}
"""
SD2_UNET = """
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {use_checkpoint: True, use_fp16: True, image_size: 32, in_channels: IN, out_channels: 4,
               model_channels: 320, attention_resolutions: [4, 2, 1], num_res_blocks: 2, channel_mult: [1, 2, 4, 4],
               num_head_channels: 64, use_spatial_transformer: True, use_linear_in_transformer: True,
               transformer_depth: 1, context_dim: 1024, legacy: False}
"""
HEAD = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.TARGET
  params:
    EXTRA
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    channels: 4
    cond_stage_trainable: false
    conditioning_key: COND
    scale_factor: 0.18215
    use_ema: False
"""
CLIP = """
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""
OPENCLIP = """
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params: {freeze: True, layer: "penultimate"}
"""
DEPTH = """
    depth_stage_config:
      target: ldm.modules.midas.api.MiDaSInference
      params: {model_type: "dpt_hybrid"}
"""
X4 = """
model:
  target: ldm.models.diffusion.ddpm.LatentUpscaleDiffusion
  params:
    parameterization: "v"
    low_scale_key: "lr"
    linear_start: 0.0001
    linear_end: 0.02
    timesteps: 1000
    conditioning_key: "hybrid-adm"
    scale_factor: 0.08333
    use_ema: False
    low_scale_config:
      target: ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation
      params: {noise_schedule_config: {linear_start: 0.0001, linear_end: 0.02}, max_noise_level: 350}
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {use_checkpoint: True, num_classes: 1000, image_size: 128, in_channels: 7, out_channels: 4,
               model_channels: 256, attention_resolutions: [2, 4, 8], num_res_blocks: 2, channel_mult: [1, 2, 2, 4],
               disable_self_attentions: [True, True, True, False], disable_middle_self_attn: False, num_heads: 8,
               use_spatial_transformer: True, transformer_depth: 1, context_dim: 1024, legacy: False,
               use_linear_in_transformer: True}
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig: {double_z: True, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 128,
                   ch_mult: [1, 2, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}
        lossconfig: {target: torch.nn.Identity}
""" + OPENCLIP


def _config(target, cond, unet, text, in_channels, extra="", more=""):
    head = HEAD.replace("TARGET", target).replace("COND", cond).replace("EXTRA", extra)
    return head + unet.replace("IN", str(in_channels)) + VAE + text + more


OFFICIAL = {
    "v1-inference.yaml": ("sd1", _config("LatentDiffusion", "crossattn", SD1_UNET, CLIP, 4)),
    "v1-inpainting-inference.yaml": ("sd1_inpaint", _config("LatentInpaintDiffusion", "hybrid", SD1_UNET, CLIP, 9)),
    "v2-inference.yaml": ("sd2", _config("LatentDiffusion", "crossattn", SD2_UNET, OPENCLIP, 4)),
    "v2-inference-v.yaml": ("sd2", _config("LatentDiffusion", "crossattn", SD2_UNET, OPENCLIP, 4,
                                           extra='parameterization: "v"')),
    "v2-inpainting-inference.yaml": ("sd2_inpaint", _config("LatentInpaintDiffusion", "hybrid", SD2_UNET, OPENCLIP, 9)),
    "v2-midas-inference.yaml": ("sd2_depth", _config("LatentDepth2ImageDiffusion", "hybrid", SD2_UNET, OPENCLIP, 5,
                                                     more=DEPTH)),
    "x4-upscaling.yaml": ("x4_upscaler", X4),
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_presets_equal_the_official_configs(name):
    family, text = OFFICIAL[name]
    cfg = from_yaml_dict(yaml.safe_load(text))
    expected = PRESETS[family]
    if expected.parameterization is None:  # 512-base and 768-v share a layout; the config tells them apart
        expected = replace(expected, parameterization="v" if name.endswith("-v.yaml") else "eps")
    assert cfg == expected


@pytest.mark.parametrize("name", FIXTURES)
def test_reference_fixture_configs_are_read(name):
    cfg = from_yaml(FIXTURES[name] / f"{name}.yaml")
    assert cfg.unet.model_channels == 32 and cfg.vae.downsampling_factor == 2 and cfg.text.width == 32
    assert cfg.parameterization == ("v" if name == "sd2v_tiny" else "eps")


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        from_yaml(tmp_path / "broken.yaml")
    (tmp_path / "other.yaml").write_text("model: {params: {}}")
    with pytest.raises(ConfigError, match="not a latent diffusion config"):
        from_yaml(tmp_path / "other.yaml")
    doc = yaml.safe_load(OFFICIAL["v1-inference.yaml"][1])
    doc["model"]["params"]["cond_stage_config"]["target"] = "ldm.modules.encoders.modules.FrozenT5Embedder"
    with pytest.raises(ConfigError, match="FrozenT5Embedder"):
        from_yaml_dict(doc)


def test_each_family_is_recognised_by_the_rule_of_its_name():
    """A family's network side (models/config.py) and its checkpoint side (weights/families.py) agree: the
    rule names the preset's UNet input channels, class labels and text encoder."""
    from models.config import FAMILIES
    from models.text_encoders import TEXT_ENCODERS, text_encoder
    from weights import GENERATIONS, PREFIXES, RULES

    rules = {r.name: r for r in RULES}
    generations = {g.name: g for g in GENERATIONS}
    assert [f.name for f in FAMILIES] == list(rules)
    assert {g.text for g in GENERATIONS} == {e.component for e in TEXT_ENCODERS} <= set(PREFIXES)
    for family in FAMILIES:
        rule, unet = rules[family.name], family.preset.unet
        gen = generations[rule.generation]
        assert (rule.in_channels, rule.label_emb) == (unet.in_channels, unet.num_classes is not None)
        assert gen.text == text_encoder(family.preset.text).component
        assert gen.context_width == unet.context_dim == family.preset.text.width
        assert gen.proj_in_rank == (2 if unet.use_linear_in_transformer else 4)


def test_a_binary_file_as_config_is_one_config_error(tmp_path):
    from models.config import ConfigError, from_yaml

    path = tmp_path / "garbage.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not a YAML text file"):
        from_yaml(path)
