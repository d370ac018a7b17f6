"""UNet: official layouts, the original implementation's outputs, and diffusers as a second oracle."""
from dataclasses import replace

import pytest
import torch
import yaml

from conftest import FIXTURES, LAYOUT_FAMILY, fixture_config, fixture_tensors, layout_shapes, load_fixture_part
from models.config import PRESETS, from_yaml_dict
from models.unet import UNetModel

PREFIX = "model.diffusion_model."


@pytest.mark.parametrize("layout", sorted(LAYOUT_FAMILY))
def test_layout_matches_official_keys_and_shapes(layout):
    expected = layout_shapes(layout, PREFIX)
    with torch.device("meta"):
        unet = UNetModel(PRESETS[LAYOUT_FAMILY[layout]].unet)
    got = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: s for k, s in got.items() if expected[k] != s} == {}


@pytest.mark.parametrize("name", FIXTURES)
def test_forward_matches_original(name):
    unet = UNetModel(fixture_config(name).unet)
    unet.load_state_dict(load_fixture_part(name, PREFIX), strict=True)
    f = fixture_tensors(name, "unet_forward")
    with torch.no_grad():
        out = unet(f["x"], f["t"], f["context"])
    assert (out - f["out"]).abs().max().item() <= 1e-4


def _diffusers_unet(yaml_doc, unet_state):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    checkpoint = {PREFIX + k: v for k, v in unet_state.items()}
    config = create_unet_diffusers_config_from_ldm(yaml_doc, checkpoint)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return ref.eval()


def _random_unet(cfg, seed):
    torch.manual_seed(seed)
    unet = UNetModel(cfg)
    with torch.no_grad():
        for p in unet.parameters():  # no zero-initialised layer may hide a wiring error
            p.copy_(torch.randn_like(p) * 0.3)
    return unet.eval()


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("in_channels", [4, 9])
@pytest.mark.parametrize("hw", [(16, 16), (18, 14), (13, 9)])  # odd latents: skips of unequal size
def test_matches_diffusers(name, in_channels, hw):
    doc = yaml.safe_load((FIXTURES[name] / f"{name}.yaml").read_text())
    doc["model"]["params"]["unet_config"]["params"]["in_channels"] = in_channels
    cfg = from_yaml_dict(doc, FIXTURES[name]).unet
    ours = _random_unet(cfg, seed=in_channels)
    ref = _diffusers_unet(doc, ours.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_channels, *hw, generator=g)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        diff = (ours(x, t, ctx) - ref(x, t, encoder_hidden_states=ctx).sample).abs().max().item()
    assert diff <= 1e-4


def test_upscaler_unet_matches_diffusers():
    """The x4 upscaler's two peculiarities: the noise level as a class label, and levels whose
    self-attention looks at the text instead (diffusers: only_cross_attention)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    cfg = replace(PRESETS["x4_upscaler"].unet, model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 4),
                  context_dim=32, num_heads=2, disable_self_attentions=(True, True, False))
    ours = _random_unet(cfg, seed=3)
    doc = {"model": {"params": {
        "unet_config": {"params": {k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in cfg.__dict__.items() if v is not None}},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4]}}}}}}
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(doc, checkpoint)
    config.update(num_class_embeds=1000, only_cross_attention=[True, True, False])
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    converted["class_embedding.weight"] = ours.label_emb.weight.detach().clone()
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 7, 12, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t, level = torch.tensor([500, 20]), torch.tensor([20, 350])
    with torch.no_grad():
        diff = (ours(x, t, ctx, y=level) - ref(x, t, encoder_hidden_states=ctx, class_labels=level).sample).abs().max()
    assert diff.item() <= 1e-4
    with pytest.raises(ValueError, match="noise level"):
        ours(x, t, ctx)


def test_batch_rows_are_independent():
    unet = _random_unet(fixture_config("sd1_tiny").unet, seed=5)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 77, 32, generator=g)
    t = torch.tensor([1, 500, 999])
    with torch.no_grad():
        batched = unet(x, t, ctx)
        alone = unet(x[1:2], t[1:2], ctx[1:2])
    assert (batched[1:2] - alone).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family,yaml_params", [
    ("sd1", {"num_heads": 8, "use_linear_in_transformer": False, "context_dim": 768}),
    ("sd2", {"num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024}),
])
def test_full_size_matches_diffusers(family, yaml_params):
    cfg = PRESETS[family].unet
    params = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
              "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "transformer_depth": 1, **yaml_params}
    doc = {"model": {"params": {"unet_config": {"params": params},
                                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    torch.manual_seed(0)
    ours = UNetModel(cfg).eval()
    ref = _diffusers_unet(doc, ours.state_dict())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, cfg.context_dim, generator=g)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        out = ours(x, t, ctx)
        diff = (out - ref(x, t, encoder_hidden_states=ctx).sample).abs().max().item()
    print(f"{family} full-size UNet vs diffusers: max abs diff {diff:.2e} (output absmax {out.abs().max():.2f})")
    assert diff <= 1e-4 and out.abs().max() > 0.1
