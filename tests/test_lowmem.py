"""Low-memory modes: attention slicing, VAE tiling, lowvram offloading (all on tiny models)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ldm
from conftest import FIXTURES, diffusers_vae_twin, fixture_config, load_fixture_part
from ldm.offload import enable_lowvram
from ldm.pipeline import img2img, txt2img
from models import layers
from models.layers import attention, set_attention_slicing
from models.prepack import unpack_convolutions
from models.tiling import Tiling, enable_vae_tiling, tile_spans, tiled
from models.unet import CrossAttention, UNetModel
from models.vae import AttnBlock, AutoencoderKL

PROMPT = "a photograph of an astronaut riding a horse"
VAE_PREFIX = "first_stage_model."


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _fixture_vae() -> AutoencoderKL:
    vae = AutoencoderKL(fixture_config("sd1_tiny").vae).eval().requires_grad_(False)
    vae.load_state_dict(load_fixture_part("sd1_tiny", VAE_PREFIX), strict=True)
    return vae


def _fixture_unet() -> UNetModel:
    unet = UNetModel(fixture_config("sd1_tiny").unet).eval().requires_grad_(False)
    unet.load_state_dict(load_fixture_part("sd1_tiny", "model.diffusion_model."), strict=True)
    return unet


def _model():
    name = "sd1_tiny"
    return ldm.load(FIXTURES[name] / f"{name}.safetensors", config=FIXTURES[name] / f"{name}.yaml", device="cpu")


# ---------------------------------------------------------------- 1. attention slicing
def _spy_sdpa(monkeypatch) -> list:
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[-2], q.dtype))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("tk", [37, 7])  # self-attention, and cross-attention over a short context
@pytest.mark.parametrize("slices", [1, 2, 3, 5, 36, 37, 100])
def test_sliced_attention_equals_unsliced(monkeypatch, slices, tk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, 32, generator=g)
    k, v = torch.randn(2, tk, 32, generator=g), torch.randn(2, tk, 32, generator=g)
    whole = attention(q, k, v, heads=4)
    calls = _spy_sdpa(monkeypatch)
    sliced = attention(q, k, v, heads=4, slices=slices)
    assert _max_diff(sliced, whole) <= 1e-5
    chunk = math.ceil(37 / slices)
    assert [n for n, _ in calls] == [min(chunk, 37 - s) for s in range(0, 37, chunk)]


def test_sliced_half_attention_keeps_float32_logits(monkeypatch):
    """Where half attention is cast to float32 by hand (meta stands in for MPS), every slice is."""
    monkeypatch.setattr(layers, "HALF_SUMS_IN_HALF", ("mps", "meta"))
    q = torch.empty(1, 50, 16, dtype=torch.float16, device="meta")
    calls = _spy_sdpa(monkeypatch)
    sliced = attention(q, q, q, heads=2, slices=4)
    assert sliced.dtype == torch.float16
    assert {dtype for _, dtype in calls} == {torch.float32} and len(calls) == 4
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(1, 50, 16, generator=g).half() for _ in range(3))
    assert _max_diff(attention(a, b, c, heads=2, slices=4), attention(a, b, c, heads=2)) == 0.0


def test_the_kernel_gets_contiguous_head_features(monkeypatch):
    """The VAE's q, k, v are channel-major views of its pixels; handed over strided, PyTorch's CPU kernel
    holds every (Tq, Tk) logit (+2.3 GB in a 1024x1024 decode). Every call, sliced or not, gets them
    contiguous, and the result is the strided inputs' attention."""
    strides, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        strides.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return real(q, k, v, *args, **kwargs)

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 48, 37, generator=g).transpose(1, 2) for _ in range(3))  # (B, T, C), strided
    expected = attention(q.contiguous(), k.contiguous(), v.contiguous(), heads=2)
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    assert _max_diff(attention(q, k, v, heads=2), expected) == 0.0
    with torch.no_grad():
        _fixture_vae().decode(torch.randn(1, 4, 12, 10, generator=g))
        vae = _fixture_vae()
        set_attention_slicing(vae, 3)
        vae.decode(torch.randn(1, 4, 12, 10, generator=g))
    assert len(strides) > 3 and set(strides) == {(1, 1, 1)}


def test_set_attention_slicing_is_per_model_and_exact():
    unet, vae, other = _fixture_unet(), _fixture_vae(), _fixture_vae()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([900])
    context = torch.randn(1, 77, unet.cfg.context_dim, generator=g)
    z = torch.randn(1, 4, 12, 10, generator=g)
    with torch.no_grad():
        ref_unet, ref_vae = unet(x, t, context), vae.decode(z)
        n_unet = sum(isinstance(m, CrossAttention) for m in unet.modules())
        assert set_attention_slicing(unet, 3) == n_unet > 0  # 256 and 64 queries: 3 divides neither
        assert set_attention_slicing(vae, 7) == sum(isinstance(m, AttnBlock) for m in vae.modules()) > 0
        assert all(m.attention_slices == 1 for m in other.modules() if hasattr(m, "attention_slices"))
        assert _max_diff(unet(x, t, context), ref_unet) <= 1e-5
        assert _max_diff(vae.decode(z), ref_vae) <= 1e-5
    set_attention_slicing(unet, None)
    assert all(m.attention_slices == 1 for m in unet.modules() if hasattr(m, "attention_slices"))
    with pytest.raises(ValueError, match="positive"):
        set_attention_slicing(unet, -2)


# ---------------------------------------------------------------- 2. VAE tiling: the blending itself
@pytest.mark.parametrize("length,tile,overlap", [(128, 64, 16), (100, 64, 16), (65, 64, 8), (48, 16, 4),
                                                 (64, 64, 16), (30, 64, 16), (128, 64, 0)])
def test_tile_spans_cover_with_full_tiles_and_enough_overlap(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    if length <= tile:
        assert spans == [(0, length)]
        return
    assert all(e - s == tile for s, e in spans)
    assert all(a[1] - b[0] >= overlap for a, b in zip(spans, spans[1:]))
    assert len(spans) == math.ceil((length - overlap) / (tile - overlap))  # the fewest that do


def test_blending_reproduces_any_pixelwise_function_exactly():
    """Weights of overlapping tiles sum to one everywhere: a function without spatial context
    (nearest 2x upsampling then tanh for a decoder, 2x2 average pooling for an encoder) comes out
    as if computed whole."""
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    up = lambda t: torch.tanh(F.interpolate(t, scale_factor=2.0, mode="nearest"))
    assert _max_diff(tiled(up, x, Tiling(16, 5), 1, 2), up(x)) <= 1e-6
    pool = lambda t: F.avg_pool2d(t, 2)
    assert _max_diff(tiled(pool, x, Tiling(8, 3), 2, 1), pool(x)) <= 1e-6


def _steps(img: torch.Tensor) -> torch.Tensor:
    return img.diff(dim=-1).abs().amax(dim=(0, 1, 2))  # the largest horizontal step, per column boundary


def test_blending_is_seamless_where_tiles_disagree():
    """The failure mode of tiling is that tiles disagree (per-tile group-norm statistics shift each
    tile's colours). With fn adding a per-tile constant, pasting tiles makes a step of the full
    difference; the crossfade spreads it over the overlap, a step of at most difference / overlap."""
    offsets = [0.0, 1.0, -0.5, 2.0, 0.5]
    spans = tile_spans(50, 16, 6)
    assert len(spans) == len(offsets)
    it = iter(offsets)
    fn = lambda t: F.interpolate(t, scale_factor=2.0) * 0 + next(it)
    out = tiled(fn, torch.zeros(1, 1, 8, 50), Tiling(16, 6), 1, 2)
    it = iter(offsets)
    pasted = torch.cat([fn(torch.zeros(1, 1, 8, e - s)) for s, e in spans], dim=-1)
    jump = max(abs(a - b) for a, b in zip(offsets, offsets[1:]))
    min_overlap_px = 2 * min(a[1] - b[0] for a, b in zip(spans, spans[1:]))
    assert _steps(pasted).max() == jump
    assert _steps(out).max() <= jump / min_overlap_px + 1e-6
    assert out.amin() >= min(offsets) and out.amax() <= max(offsets)  # convex combinations of the tiles


# ---------------------------------------------------------------- 3. VAE tiling: the fixture VAE
def test_one_tile_is_the_untiled_vae():
    vae = _fixture_vae()
    g = torch.Generator().manual_seed(4)
    z, image = torch.randn(1, 4, 24, 16, generator=g), torch.rand(1, 3, 48, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ref_dec, ref_enc = vae.decode(z), vae.encode(image)
        enable_vae_tiling(vae, Tiling(24, 6))
        assert torch.equal(vae.decode(z), ref_dec)
        assert torch.equal(vae.encode(image).mean, ref_enc.mean)


def test_tiled_vae_is_close_to_untiled_and_closer_than_diffusers_tiling():
    """Tiled vs untiled on the sd1_tiny VAE (random weights, f=2) for a 48x40 latent (96x80 image) in
    24-latent tiles with diffusers' default overlap factor 0.25. Per-tile group norms, zero padding at
    inner tile edges and the mid-block attention seeing one tile make the difference; on this random
    VAE it is large (mean |diff| ~0.05 for outputs of std ~0.56), so the check against the untiled
    output is loose and the sharp one is relative: diffusers' `enable_tiling` on the same weights
    and tiles must differ from the untiled output at least as much as ours."""
    vae = _fixture_vae()
    theirs = diffusers_vae_twin(vae)
    theirs.tile_latent_min_size, theirs.tile_sample_min_size, theirs.tile_overlap_factor = 24, 48, 0.25
    g = torch.Generator().manual_seed(5)
    z, image = torch.randn(1, 4, 48, 40, generator=g), torch.rand(1, 3, 96, 80, generator=g) * 2 - 1
    with torch.no_grad():
        ref_dec, ref_mean = vae.decode(z), vae.encode(image).mean
        assert _max_diff(theirs.decode(z).sample, ref_dec) <= 1e-4  # the same network untiled
        enable_vae_tiling(vae, Tiling(24, 6))
        ours_dec, ours_mean = vae.decode(z), vae.encode(image).mean
        theirs.enable_tiling()
        theirs_dec, theirs_mean = theirs.decode(z).sample, theirs.encode(image).latent_dist.mean
    errors = {name: ((a - ref).abs().mean().item(), (a - ref).abs().max().item()) for name, a, ref in (
        ("ours decode", ours_dec, ref_dec), ("diffusers decode", theirs_dec, ref_dec),
        ("ours encode", ours_mean, ref_mean), ("diffusers encode", theirs_mean, ref_mean))}
    print("\n(mean, max) |tiled - untiled|:", {k: tuple(round(x, 4) for x in v) for k, v in errors.items()})
    assert errors["ours decode"][0] <= 0.08 and errors["ours decode"][1] <= 0.6
    assert errors["ours encode"][0] <= 0.08 and errors["ours encode"][1] <= 0.6
    assert errors["ours decode"][0] <= errors["diffusers decode"][0]
    assert errors["ours encode"][0] <= errors["diffusers encode"][0]


def test_tiled_vae_decode_has_no_seams():
    """A seam is a step along a whole tile border. Averaged over the batch and the rows, the error
    against the untiled decode shows one as a step at a single column. Ours: no step at tile edges
    or overlap centres larger than the largest anywhere else; the same tiles pasted without blending
    (cut in the middle of each overlap), the control, do have one."""
    vae = _fixture_vae()
    tiling = Tiling(24, 8)
    z = torch.randn(4, 4, 24, 64, generator=torch.Generator().manual_seed(6))  # tiled along the width only
    spans = tile_spans(64, tiling.tile, tiling.overlap)
    cuts = [0] + [a[1] + b[0] for a, b in zip(spans, spans[1:])] + [128]  # overlap centres, in pixels
    with torch.no_grad():
        ref = vae.decode(z)
        pasted = torch.empty_like(ref)
        for (s, _), a, b in zip(spans, cuts, cuts[1:]):
            pasted[..., a:b] = vae.decode(z[..., s:s + tiling.tile])[..., a - 2 * s:b - 2 * s]
        enable_vae_tiling(vae, tiling)
        ours = vae.decode(z)
    borders = sorted({2 * s for s, _ in spans[1:]} | {2 * e for _, e in spans[:-1]} | set(cuts[1:-1]))
    at = torch.tensor([b - 1 for b in borders])  # the step between columns b - 1 and b

    def seam_and_rest(out):
        steps = (out - ref).mean(dim=(0, 2)).diff(dim=-1).abs().amax(dim=0)  # (W - 1,)
        rest = torch.ones_like(steps, dtype=torch.bool)
        rest[at] = False
        return steps[at].max().item(), steps[rest].max().item()

    ours_seam, ours_rest = seam_and_rest(ours)
    pasted_seam, pasted_rest = seam_and_rest(pasted)
    print(f"\nlargest error step at borders / elsewhere: blended {ours_seam:.4f} / {ours_rest:.4f}, "
          f"pasted {pasted_seam:.4f} / {pasted_rest:.4f}")
    assert pasted_seam > pasted_rest  # the measure sees a seam when there is one
    assert ours_seam <= ours_rest


# ---------------------------------------------------------------- 4. lowvram
def _all_home(offload) -> bool:
    return all(table[name] is kept or table[name].data_ptr() == kept.data_ptr()
               for unit in offload.units.values() for table, name, kept, _ in unit.home)


def test_lowvram_equals_normal_mode_and_weights_go_back_between_calls():
    model = _model()
    # Offloading alone is compared: it unpacks the CPU convolutions, which round differently (test_prepack).
    unpack_convolutions(model.unet), unpack_convolutions(model.vae)
    kw = dict(seed=3, steps=2, sampler="ddim", scale=7.5)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
    ref_t2i = txt2img(model, PROMPT, height=32, width=32, **kw)[0]
    ref_i2i = img2img(model, image, PROMPT, strength=0.5, **kw)[0]

    offload = enable_lowvram(model, "cpu")  # compute and store both CPU: every move is still a copy
    assert _all_home(offload) and offload.resident() == []
    calls, seen_copies = {name: 0 for name in offload.units}, []

    def count(name):
        def hook(module, args):
            calls[name] += 1
            table, key, kept, _ = offload.units[name].home[0]
            seen_copies.append(table[key].data_ptr() != kept.data_ptr())
            assert offload.resident() == [name]  # one network (part) at a time
        return hook

    spies = [unit.module.register_forward_pre_hook(count(name))  # runs after lowvram's own pre-hook
             for name, unit in offload.units.items()]

    t2i = txt2img(model, PROMPT, height=32, width=32, **kw)[0]
    assert _all_home(offload) and offload.resident() == []
    i2i = img2img(model, image, PROMPT, strength=0.5, **kw)[0]
    assert _all_home(offload) and offload.resident() == []
    assert _max_diff(t2i, ref_t2i) <= 1e-5 and _max_diff(i2i, ref_i2i) <= 1e-5
    assert offload.loads() == calls
    assert calls["text_encoder"] == 4 and calls["vae.decoder"] == 2 and calls["vae.encoder"] == 1
    assert calls["unet.input_blocks.0"] == calls["unet.out"] == 2 + 1  # 2 + int(0.5 * 2) steps
    assert all(seen_copies)  # each call ran on its own copy of the weights
    assert all(t.device.type == "cpu" for net in (model.unet, model.vae, model.text_encoder)
               for t in net.parameters())

    for spy in spies:
        spy.remove()
    offload.remove()
    assert offload.loads() == {}
    assert _max_diff(txt2img(model, PROMPT, height=32, width=32, **kw)[0], ref_t2i) <= 1e-5


def test_lowvram_whole_unet_and_failed_calls_leave_the_weights_home():
    model = _model()
    offload = enable_lowvram(model, unet_parts=False)
    assert "unet" in offload.units and "unet.out" not in offload.units
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(RuntimeError):
        model.unet(x, torch.tensor([1]), torch.randn(1, 77, 5))  # wrong context width
    assert offload.resident() == [] and _all_home(offload)
    with torch.no_grad():
        out = model.unet(x, torch.tensor([1]), torch.randn(1, 77, model.config.unet.context_dim))
    assert out.shape == x.shape and offload.loads()["unet"] == 2 and _all_home(offload)


def test_memory_flags_on_the_command_line_give_the_same_image(tmp_path):
    """--attention-slicing and --lowvram (on the CPU: no packed weight copies) leave the image as it is;
    --vae-tiling only starts tiling past one tile (512 px), so a small image is untouched too."""
    import numpy as np
    from PIL import Image

    from conftest import FIXTURES
    from ldm import generate

    ckpt = FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"
    base = ["--prompt", "a red apple", "--ckpt", str(ckpt), "--H", "64", "--W", "64", "--f", "2",
            "--ddim_steps", "4", "--n_samples", "1", "--n_iter", "1", "--skip_grid"]
    images = []
    for name, flags in [("plain", []), ("sliced", ["--attention-slicing", "3"]),
                        ("low", ["--lowvram", "--vae-tiling"])]:
        assert generate.main("txt2img", base + ["--outdir", str(tmp_path / name), *flags]) == 0
        images.append(np.asarray(Image.open(tmp_path / name / "samples" / "00000.png")).astype(int))
    assert np.abs(images[1] - images[0]).max() <= 1 and np.abs(images[2] - images[0]).max() <= 1


def test_lowvram_on_the_cpu_keeps_no_packed_weight_copies(tmp_path):
    """On a CPU-only run --lowvram trades the packed convolutions' second weight copy for speed: the networks
    come back as plain nn.Conv2d, and the run says so."""
    from ldm.options import build_parser, validate
    from ldm.runtime import load_for_run
    from models.prepack import PackedConv2d

    ckpt = str(FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt")
    packed = {}
    for flags in ([], ["--lowvram"]):
        args = build_parser("txt2img").parse_args(["--ckpt", ckpt, "--H", "64", "--W", "64", "--device", "cpu",
                                                  "--dtype", "float32", *flags])
        model = load_for_run(args, validate("txt2img", args))
        packed[bool(flags)] = sum(type(m) is PackedConv2d for net in (model.unet, model.vae) for m in net.modules())
        if flags:
            assert any("--lowvram on the CPU" in note for note in model.notes)
    assert packed[False] > 0 and packed[True] == 0


@pytest.mark.slow  # about two minutes of compiling on a 2-core CPU
def test_compile_on_the_cpu_gives_the_same_image(tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import FIXTURES
    from ldm import generate

    base = ["--prompt", "a red apple", "--ckpt", str(FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"), "--H", "64", "--W",
            "64", "--f", "2", "--ddim_steps", "4", "--n_samples", "1", "--n_iter", "1", "--skip_grid"]
    images = []
    for name, flags in [("eager", []), ("compiled", ["--compile"])]:
        assert generate.main("txt2img", base + ["--outdir", str(tmp_path / name), *flags]) == 0
        images.append(np.asarray(Image.open(tmp_path / name / "samples" / "00000.png")).astype(int))
    assert np.abs(images[1] - images[0]).max() <= 1


def test_compile_in_float32_on_the_cpu_says_it_was_measured_slower(tmp_path, capsys, monkeypatch):
    """The compiler itself is stood in for (the slow test above runs it); what is checked is the note."""
    from conftest import FIXTURES
    from ldm import generate, runtime

    compiled = []
    monkeypatch.setattr(runtime, "compile_unet", lambda unet, device: compiled.append(device) or unet)
    base = ["--prompt", "a red apple", "--ckpt", str(FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"), "--H", "64", "--W",
            "64", "--f", "2", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--compile"]
    assert generate.main("txt2img", base + ["--outdir", str(tmp_path / "a")]) == 0
    assert compiled == [torch.device("cpu")]
    assert "note: --compile in float32 on the CPU was measured slower" in capsys.readouterr().out
    assert generate.main("txt2img", base[:-1] + ["--outdir", str(tmp_path / "b")]) == 0
    assert "--compile" not in capsys.readouterr().out and len(compiled) == 1


def test_compile_and_lowvram_are_refused_together(tmp_path, capsys):
    from ldm import generate

    argv = ["--prompt", "x", "--ckpt", str(tmp_path / "missing.ckpt"), "--compile", "--lowvram"]
    assert generate.main("txt2img", argv) == 2
    assert "--compile and --lowvram" in capsys.readouterr().err
