"""txt2img / img2img pipelines against the original implementation, and the seeding contract."""
import numpy as np
import pytest
import torch

import ldm
from conftest import FIXTURES, fixture_meta, fixture_tensors
from ldm.images import to_uint8
from ldm.pipeline import decode, encode_image, img2img, img2img_steps, txt2img, txt2img_steps
from samplers import ddim_schedule, ddim_steps, drain, make_denoiser, noise_like, stochastic_encode

PROMPT = "a photograph of an astronaut riding a horse"


def _model(name, **kw):
    return ldm.load(FIXTURES[name] / f"{name}.safetensors", config=FIXTURES[name] / f"{name}.yaml",
                    device="cpu", **kw)


@pytest.mark.parametrize("name", FIXTURES)
def test_txt2img_from_a_prompt_matches_the_original(name):
    meta, f = fixture_meta(name, "txt2img"), fixture_tensors(name, "txt2img")
    sampler = {"PLMSSampler": "plms", "DDIMSampler": "ddim"}[meta["sampler"]]
    model = _model(name)
    # seeded right before the first draw, start code drawn first (the fixture's --fixed_code-like path)
    images = txt2img(model, meta["prompt"], seed=meta["seed"], fixed_code=True, height=meta["H"], width=meta["W"],
                     steps=meta["ddim_steps"], sampler=sampler, scale=meta["scale"], eta=meta["ddim_eta"])
    got = to_uint8(images[0])[0].astype(int)
    assert np.abs(got - f["image_uint8_hwc"].numpy().astype(int)).max() <= 1
    g = torch.Generator().manual_seed(meta["seed"])
    x_T = torch.randn(f["start_code"].shape, generator=g)
    assert torch.equal(x_T, f["start_code"])
    latents = drain(txt2img_steps(model, meta["prompt"], height=meta["H"], width=meta["W"], steps=meta["ddim_steps"],
                                  sampler=sampler, scale=meta["scale"], generator=g, x_T=x_T), x_T)
    assert (latents - f["samples"]).abs().max() <= 1e-3


@pytest.mark.parametrize("name", FIXTURES)
def test_img2img_draws_and_latents_match_the_original(name):
    """The original img2img with fixed conditioning tensors: posterior sample (draw 1), stochastic
    encode (draw 2) at t_enc = int(0.75 * 10), then DDIM decode from there."""
    f = fixture_tensors(name, "img2img")
    model = _model(name)
    g = torch.Generator().manual_seed(31)
    init_latent = encode_image(model, f["init_image"], g)
    assert (init_latent - f["init_latent"]).abs().max() <= 1e-4
    z = stochastic_encode(init_latent, model.alphas_cumprod, 10, 7, noise=noise_like(init_latent, g))
    assert (z - f["z_enc"]).abs().max() <= 1e-4
    # the same path through the pipeline, with the fixture's conditioning in place of prompts
    denoise = make_denoiser(model.unet, f["c"], f["uc"], 7.5, model.parameterization, model.alphas_cumprod)
    out = drain(ddim_steps(denoise, z, ddim_schedule(model.alphas_cumprod, 10)[:7], generator=g), z)
    assert (out - f["samples"]).abs().max() <= 1e-3
    assert (decode(model, out) - f["decoded"]).abs().max() <= 1e-3


def test_img2img_from_a_prompt_runs_and_strength_decides_the_steps():
    model = _model("sd1_tiny")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    g = torch.Generator().manual_seed(1)
    latent = encode_image(model, image, g)
    steps = list(img2img_steps(model, latent, PROMPT, strength=0.5, steps=10, sampler="ddim", generator=g))
    assert len(steps) == 5
    plms = list(img2img_steps(model, latent, PROMPT, strength=0.3, steps=10, sampler="plms", generator=g))
    assert len(plms) == 3
    full = list(img2img_steps(model, latent, PROMPT, strength=1.0, steps=4, sampler="ddim", generator=g))
    assert len(full) == 4  # the original indexes past its table here
    with pytest.raises(ValueError, match="strength"):
        next(img2img_steps(model, latent, PROMPT, strength=1.5, steps=10))
    a = img2img(model, image, PROMPT, seed=3, strength=0.2, steps=10)[0]
    b = img2img(model, image, PROMPT, seed=3, strength=0.9, steps=10)[0]
    assert (a - image).abs().mean() < (b - image).abs().mean()


def test_n_iter_draws_follow_the_original_stream():
    """Iteration 2's x_T is the draw after iteration 1's x_T and its per-step noise (DDIM draws one
    x-shaped tensor per step even at eta = 0)."""
    model = _model("sd1_tiny")
    kw = dict(height=64, width=64, steps=4, sampler="ddim", scale=7.5)
    both = txt2img(model, PROMPT, seed=7, n_iter=2, **kw)
    g = torch.Generator().manual_seed(7)
    shape = (1, 4, 32, 32)
    torch.randn(shape, generator=g)
    for _ in range(4):
        torch.randn(shape, generator=g)
    x2 = torch.randn(shape, generator=g)
    second = decode(model, drain(txt2img_steps(model, PROMPT, x_T=x2, generator=g, **kw), x2))
    assert torch.equal(both[1], second)
    # --fixed_code: one x_T for every iteration, so a deterministic sampler repeats its image, and a
    # stochastic one (eta > 0) differs only through the per-step noise
    fixed = txt2img(model, PROMPT, seed=7, n_iter=2, fixed_code=True, **kw)
    assert torch.equal(fixed[0], fixed[1])
    noisy = txt2img(model, PROMPT, seed=7, n_iter=2, fixed_code=True, eta=1.0, **kw)
    assert not torch.equal(noisy[0], noisy[1])


@pytest.mark.parametrize("hw", [(68, 68), (64, 48), (40, 88)])
def test_sizes_whose_latent_does_not_halve_evenly_work(hw):
    """68 px with f=2 is a 34×34 latent: 34 → 17 → 9 going down; the original crashes coming back up."""
    model = _model("sd2_tiny")
    images = txt2img(model, PROMPT, seed=1, height=hw[0], width=hw[1], steps=2, sampler="ddim")
    assert images[0].shape == (1, 3, *hw) and torch.isfinite(images[0]).all()


def test_steps_can_be_watched_stopped_and_steered():
    model = _model("sd1_tiny")
    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(height=64, width=64, steps=5, sampler="ddim", x_T=x_T)
    seen = []
    for step in txt2img_steps(model, PROMPT, **kw):
        seen.append(step.index)
        assert step.pred_x0.shape == x_T.shape and step.eps.shape == x_T.shape
        if step.index == 2:
            break
    assert seen == [0, 1, 2]
    steps = txt2img_steps(model, PROMPT, **kw)
    first = next(steps)
    first.x_next = torch.zeros_like(first.x_next)
    assert torch.equal(next(steps).x, first.x_next)


def test_a_nan_in_the_text_encoder_is_named_before_any_step():
    from ldm.pipeline import NonFiniteError

    model = _model("sd1_tiny")
    with torch.no_grad():
        model.text_encoder.text_model.final_layer_norm.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match="text encoder's output holds NaN"):
        next(txt2img_steps(model, "a red apple", height=32, width=32, steps=2))


def test_a_half_vae_that_overflows_is_decoded_again_in_float32(monkeypatch):
    """SD 2.x's VAE can overflow in float16: the decode is redone in float32, the VAE stays float32, and
    the run says so. The overflow is stood in for (this CPU has no float16 convolutions)."""
    model = _model("sd1_tiny")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    model.vae.to(torch.bfloat16)
    real = type(model.vae).decode

    def overflowing(vae, z):
        out = real(vae, z)
        return torch.full_like(out, float("inf")) if z.dtype == torch.bfloat16 else out

    monkeypatch.setattr(type(model.vae), "decode", overflowing)
    with pytest.warns(UserWarning, match="VAE overflowed in bfloat16; decoding in float32"):
        image = decode(model, latents)
    assert model.vae.post_quant_conv.weight.dtype == torch.float32 and any("overflowed" in n for n in model.notes)
    with torch.no_grad():  # the float32 decode of the same (bf16-rounded) weights
        assert torch.equal(image, real(model.vae, latents / model.scale_factor).float())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: there the flags are read once, at the end of the run"))])
def test_the_first_non_finite_step_is_named(device):
    from ldm.pipeline import NonFiniteError, _checked
    from samplers import Step

    def steps():
        for i in range(3):
            x = torch.full((1, 4, 2, 2), float("nan") if i >= 1 else 0.0, device=device)
            yield Step(index=i, total=3, x=x, eps=x, pred_x0=x, x_next=x)

    seen = []
    with pytest.raises(NonFiniteError, match="step 2 of 3's prediction holds NaN"):
        for step in _checked(steps()):
            seen.append(step.index)
    assert seen == ([0] if device == "cpu" else [0, 1, 2])  # the CPU stops at once; CUDA when the run ends
