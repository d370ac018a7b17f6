"""Text encoders and tokenizer against the official layouts, the reference fixtures, and transformers /
open_clip models holding the same random weights."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE
from models.clip_text import CLIPTextModel, normalize_clip_keys
from models.config import CLIP_L, OPENCLIP_H, CLIPTextConfig, OpenCLIPTextConfig, from_yaml
from models.openclip_text import OpenCLIPTextModel, normalize_openclip_keys
from models.tokenizer import END, START, Tokenizer, tokenizer_for

FIX = REFERENCE / "fixtures"
TOL = 1e-4
# for the full-size towers: the kind of prompt SD sees, tokenized by each family's own tokenizer
REAL_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a rocky cliff at sunset, dramatic sky, highly detailed",
]

TINY_CLIP = CLIPTextConfig(width=32, layers=2, heads=2, intermediate_size=64)
TINY_OPENCLIP = OpenCLIPTextConfig(width=32, layers=2, heads=2, embed_dim=32)

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "Hello, World!  A   <b>bold</b> café &amp; 3.14159 ... don't STOP!!",
    " ".join(["a red fox jumping over the lazy dog"] * 20),  # far beyond 77 tokens
]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _randomize(module: torch.nn.Module, seed: int, fan_in: bool = False) -> None:
    """Every parameter random (LayerNorms and biases included), so no term of the forward hides.
    Matrices have std 0.3, or with `fan_in` 1/sqrt(fan_in): at width 768+ a fixed 0.3 would blow the
    attention logits up until every softmax is one-hot, and the comparison would test little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = p.ndim == 1 and name.endswith("weight")
            std = (p.shape[-1] ** -0.5 if fan_in else 0.3) if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std + float(is_norm_scale))


# ---------------------------------------------------------------- layouts
@pytest.mark.parametrize("model_cls, cfg, layout, prefix", [
    (CLIPTextModel, CLIP_L, "sd1.json", "cond_stage_model.transformer."),
    (OpenCLIPTextModel, OPENCLIP_H, "sd2_base.json", "cond_stage_model.model."),
])
def test_layout_matches_official(model_cls, cfg, layout, prefix):
    keys = json.loads((REFERENCE / "layouts" / layout).read_text())["keys"]
    expected = {k[len(prefix):]: shape for k, (shape, _) in keys.items() if k.startswith(prefix)}
    expected.pop("text_model.embeddings.position_ids", None)
    with torch.device("meta"):
        model = model_cls(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


def test_normalize_clip_keys_variants():
    with torch.device("meta"):
        model = CLIPTextModel(CLIP_L)
    sd = model.state_dict()
    official = dict(sd, **{"text_model.embeddings.position_ids": torch.arange(77)[None]})
    flat = {k[len("text_model."):]: v for k, v in sd.items()}  # transformers 5.x re-saves
    for variant in (sd, official, flat, dict(flat, **{"embeddings.position_ids": torch.arange(77)[None]})):
        assert set(normalize_clip_keys(variant)) == set(sd)
    unknown = normalize_clip_keys({"logit_scale": torch.zeros(())})
    assert "logit_scale" in unknown  # not swallowed: a strict load will report it


def test_normalize_openclip_keys_variants():
    with torch.device("meta"):
        model = OpenCLIPTextModel(OPENCLIP_H)
    sd = model.state_dict()
    assert "attn_mask" not in sd
    custom = {("text." + k if k != "logit_scale" else k): v for k, v in sd.items()}
    for variant in (sd, dict(sd, attn_mask=torch.zeros(77, 77)), custom):
        assert set(normalize_openclip_keys(variant)) == set(sd)


# ---------------------------------------------------------------- reference fixtures
@pytest.mark.parametrize("name, prefix", [
    ("sd1_tiny", "cond_stage_model.transformer."),
    ("sd2_tiny", "cond_stage_model.model."),
    ("sd2v_tiny", "cond_stage_model.model."),
])
def test_fixture_text_encoder(name, prefix):
    d = FIX / name
    cfg = from_yaml(d / f"{name}.yaml").text
    meta = json.loads((d / "text_encoder.json").read_text())
    ref = load_file(str(d / "text_encoder.safetensors"))

    tokens = tokenizer_for(cfg)(meta["prompts"])
    assert torch.equal(tokens, ref["tokens"])

    if isinstance(cfg, CLIPTextConfig):
        model, norm = CLIPTextModel(cfg), normalize_clip_keys
    else:
        model, norm = OpenCLIPTextModel(cfg), normalize_openclip_keys
    model.load_state_dict(norm(_strip(load_file(str(d / f"{name}.safetensors")), prefix)), strict=True)
    with torch.no_grad():
        cond = model.eval()(tokens)
    diff = _max_diff(cond, ref["cond"])
    print(f"\n{name} text encoder vs fixture cond: max abs diff {diff:.3g}")
    assert cond.shape == ref["cond"].shape and diff <= TOL


def test_fixture_meta_build_and_assign_load():
    cfg = from_yaml(FIX / "sd2_tiny" / "sd2_tiny.yaml").text
    with torch.device("meta"):
        model = OpenCLIPTextModel(cfg)
    sd = _strip(load_file(str(FIX / "sd2_tiny" / "sd2_tiny.safetensors")), "cond_stage_model.model.")
    model.load_state_dict(normalize_openclip_keys(sd), strict=True, assign=True)
    ref = load_file(str(FIX / "sd2_tiny" / "text_encoder.safetensors"))
    with torch.no_grad():
        assert _max_diff(model(ref["tokens"]), ref["cond"]) <= TOL


# ---------------------------------------------------------------- transformers oracle
def _hf_clip(cfg: CLIPTextConfig):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions, hidden_act=cfg.act, layer_norm_eps=1e-5,
        bos_token_id=START, eos_token_id=END, pad_token_id=END, attn_implementation="eager",
    )).eval()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_matches_transformers(act):
    cfg = replace(TINY_CLIP, act=act)
    hf = _hf_clip(cfg)
    _randomize(hf, 0)
    tokens = Tokenizer(cfg.pad_token)(PROMPTS)
    assert tokens[3, -1] == END and (tokens[3, :-1] != END).all()  # the long prompt is truncated
    with torch.no_grad():
        out = hf(input_ids=tokens, output_hidden_states=True)
        tower = getattr(hf, "text_model", hf)  # transformers 5.x has no text_model level
        expected = {"last": out.last_hidden_state,
                    "penultimate": tower.final_layer_norm(out.hidden_states[-2])}
    for layer, want in expected.items():
        ours = CLIPTextModel(replace(cfg, layer=layer)).eval()
        ours.load_state_dict(normalize_clip_keys(hf.state_dict()), strict=True)
        with torch.no_grad():
            got = ours(tokens)
        diff = _max_diff(got, want)
        print(f"\nCLIP {act} {layer} vs transformers: max abs diff {diff:.3g}")
        assert diff <= TOL
    # the two layers really differ, so the comparison above tells them apart
    assert _max_diff(expected["last"], expected["penultimate"]) > 1e-2


@pytest.mark.slow
def test_full_size_clip_l_matches_transformers():
    """SD 1.x's text tower at full size (ViT-L/14, 123M parameters), last layer + final LN."""
    tokens = tokenizer_for(CLIP_L)(REAL_PROMPTS)
    hf = _hf_clip(CLIP_L)
    _randomize(hf, 2, fan_in=True)
    with torch.no_grad():
        want = hf(input_ids=tokens).last_hidden_state
    sd = normalize_clip_keys(hf.state_dict())
    del hf
    ours = CLIPTextModel(CLIP_L).eval()
    ours.load_state_dict(sd, strict=True)
    del sd
    with torch.no_grad():
        got = ours(tokens)
    diff = _max_diff(got, want)
    print(f"\nfull-size CLIP ViT-L/14 last vs transformers: max abs diff {diff:.2e} "
          f"(max |output| {want.abs().max().item():.3g})")
    assert got.shape == (2, 77, 768) and diff <= TOL
    assert _max_diff(want[0], want[1]) > 1e-1  # the two prompts really give different embeddings


# ---------------------------------------------------------------- open_clip oracle
def _open_clip_model(cfg: OpenCLIPTextConfig, quick_gelu: bool, fan_in: bool = False):
    """An open_clip CLIP with `cfg`'s text tower and random weights; the vision tower is a stub,
    built tiny and deleted (as FrozenOpenCLIPEmbedder deletes it)."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        text_cfg=CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                             heads=cfg.heads, layers=cfg.layers, mlp_ratio=cfg.mlp_ratio),
        quick_gelu=quick_gelu,
    ).eval()
    del model.visual
    _randomize(model, 1, fan_in=fan_in)
    return open_clip, model


def _frozen_openclip_encode(model, tokens: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """FrozenOpenCLIPEmbedder.encode_with_transformer. The original fed (T, B, W) tensors to
    open_clip 2.7's sequence-first blocks; open_clip 3.x blocks are batch-first, so the permutes go."""
    x = model.token_embedding(tokens) + model.positional_embedding
    blocks = model.transformer.resblocks
    for i, block in enumerate(blocks):
        if i == len(blocks) - layer_idx:
            break
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_openclip_matches_open_clip(act):
    cfg = replace(TINY_OPENCLIP, act=act)
    open_clip, oc = _open_clip_model(cfg, quick_gelu=act == "quick_gelu")
    tokens = Tokenizer(cfg.pad_token)(PROMPTS)
    assert torch.equal(tokens, open_clip.tokenize(PROMPTS))
    with torch.no_grad():
        expected = {
            "penultimate": _frozen_openclip_encode(oc, tokens, layer_idx=1),
            # all blocks through open_clip's own Transformer.forward, not our loop
            "last": oc.ln_final(oc.transformer(oc.token_embedding(tokens) + oc.positional_embedding,
                                               attn_mask=oc.attn_mask)),
        }
    for layer, want in expected.items():
        ours = OpenCLIPTextModel(replace(cfg, layer=layer)).eval()
        ours.load_state_dict(normalize_openclip_keys(oc.state_dict()), strict=True)
        with torch.no_grad():
            got = ours(tokens)
        diff = _max_diff(got, want)
        print(f"\nOpenCLIP {act} {layer} vs open_clip: max abs diff {diff:.3g}")
        assert diff <= TOL
    assert _max_diff(expected["last"], expected["penultimate"]) > 1e-2


@pytest.mark.slow
def test_full_size_openclip_h_matches_open_clip():
    """SD 2.x's text tower at full size (ViT-H/14, 354M parameters), penultimate block + ln_final as
    FrozenOpenCLIPEmbedder computes it."""
    open_clip = pytest.importorskip("open_clip")
    # open_clip's own ViT-H-14 config (a JSON in the package, nothing downloaded) has our preset's shape
    text_cfg = open_clip.get_model_config("ViT-H-14")["text_cfg"]
    assert text_cfg == {"context_length": OPENCLIP_H.context_length, "vocab_size": OPENCLIP_H.vocab_size,
                        "width": OPENCLIP_H.width, "heads": OPENCLIP_H.heads, "layers": OPENCLIP_H.layers}
    assert OPENCLIP_H.layer == "penultimate" and OPENCLIP_H.act == "gelu" and OPENCLIP_H.mlp_ratio == 4.0

    tokens = tokenizer_for(OPENCLIP_H)(REAL_PROMPTS)
    assert torch.equal(tokens, open_clip.tokenize(REAL_PROMPTS))
    _, oc = _open_clip_model(OPENCLIP_H, quick_gelu=False, fan_in=True)
    with torch.no_grad():
        want = _frozen_openclip_encode(oc, tokens, layer_idx=1)
    sd = normalize_openclip_keys(oc.state_dict())
    del oc
    ours = OpenCLIPTextModel(OPENCLIP_H).eval()
    ours.load_state_dict(sd, strict=True)
    del sd
    with torch.no_grad():
        got = ours(tokens)
    diff = _max_diff(got, want)
    print(f"\nfull-size OpenCLIP ViT-H/14 penultimate vs open_clip: max abs diff {diff:.2e} "
          f"(max |output| {want.abs().max().item():.3g})")
    assert got.shape == (2, 77, 1024) and diff <= TOL
    assert _max_diff(want[0], want[1]) > 1e-1


# ---------------------------------------------------------------- tokenizer
def _open_clip_tokens(prompts):
    open_clip = pytest.importorskip("open_clip")
    return open_clip.tokenize(prompts)


def test_tokenizer_sd2_equals_open_clip():
    assert torch.equal(tokenizer_for(OPENCLIP_H)(PROMPTS), _open_clip_tokens(PROMPTS))
    assert torch.equal(Tokenizer(0)(PROMPTS[0]), _open_clip_tokens(PROMPTS[0]))  # a bare string


def test_tokenizer_sd1_pads_with_end_token():
    prompts = PROMPTS + ["wow!!"]  # "!" is id 0, the SD 2.x pad: padding must not be inferred from 0s
    ours = tokenizer_for(CLIP_L)(prompts)
    ref = _open_clip_tokens(prompts)
    assert ours.shape == (len(prompts), 77) and ours.dtype == torch.long
    for row, want in zip(ours, ref):
        n = (want == END).nonzero()[0].item() + 1  # the first <end> closes the prompt
        assert torch.equal(row[:n], want[:n])
        assert (row[n:] == END).all()


def test_tokenizer_edge_cases():
    tok = Tokenizer(pad_token=END)
    empty = tok("")
    assert empty[0, 0] == START and (empty[0, 1:] == END).all()
    assert (Tokenizer(0)("")[0, 2:] == 0).all() and Tokenizer(0)("")[0, 1] == END

    long = tok(PROMPTS[3])[0]
    assert long[0] == START and long[-1] == END and (long[1:-1] != END).all()
    assert torch.equal(long[1:-1], torch.tensor(tok.encode(PROMPTS[3])[:75]))

    assert torch.equal(tok("A Photograph  of\tAN astronaut"), tok("a photograph of an astronaut"))
    batch = tok(PROMPTS)
    assert batch.shape == (4, 77)
    for i, p in enumerate(PROMPTS):
        assert torch.equal(batch[i], tok(p)[0])  # rows are independent
