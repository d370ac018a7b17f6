"""The special families' networks against the original code (../shared/reference/special), one call each:
the UNet with concatenated channels (and the x4 upscaler's class label) through the denoiser's one
conditioning path, the upscaler's f=4 VAE and its low-res noise augmentation, and the depth conditioning."""
import pytest
import torch

import ldm
from conftest import REFERENCE
from safetensors.torch import load_file
from ldm.pipeline import decode
from samplers import apply_model

SPECIAL = REFERENCE / "special"
MODELS = ("sd15_inpaint_tiny", "sd2_inpaint_tiny", "sd2_depth_tiny", "x4_upscaler_tiny")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def special_model(name: str):
    return ldm.load(SPECIAL / name / f"{name}.safetensors", config=SPECIAL / name / f"{name}.yaml",
                    device="cpu", dtype="float32")


def tensors(name: str, stem: str) -> dict:
    return load_file(SPECIAL / name / f"{stem}.safetensors")


def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> float:
    """max |got - want| relative to want's absmax, asserted below `rel`."""
    err = ((got.float() - want.float()).abs().max() / want.abs().max()).item()
    assert err <= rel, f"{err:.2e} of absmax > {rel:.0e}"
    return err


@pytest.mark.parametrize("name", MODELS)
def test_unet_forward_with_concat_channels(name):
    f, model = tensors(name, "unet_forward"), special_model(name)
    cond = {"c_crossattn": f["context"], "c_concat": f["c_concat"], "y": f.get("y")}
    with torch.no_grad():
        out = apply_model(model.unet, f["x"], f["t"], cond)
    close(out, f["out"], 1e-5)


def test_x4_vae_is_f4_with_its_own_scale_factor():
    f, model = tensors("x4_upscaler_tiny", "vae"), special_model("x4_upscaler_tiny")
    assert model.config.vae.downsampling_factor == 4 and model.scale_factor == 0.08333
    decoded = decode(model, f["z_fixed"])
    assert decoded.shape == (1, 3, 128, 128)
    close(decoded, f["decoded_z_fixed"], 1e-5)
    with torch.no_grad():
        posterior = model.vae.encode(f["image"])
    close(posterior.mean, f["posterior_mean"], 1e-5)
    close(posterior.logvar, f["posterior_logvar"], 1e-5)


def test_x4_low_scale_noise_augmentation():
    f, model = tensors("x4_upscaler_tiny", "low_scale_noise_aug"), special_model("x4_upscaler_tiny")
    aug = model.low_scale_model
    assert aug.max_noise_level == 350
    assert torch.equal(aug.sqrt_alphas_cumprod, f["sqrt_alphas_cumprod"])
    assert torch.equal(aug.sqrt_one_minus_alphas_cumprod, f["sqrt_one_minus_alphas_cumprod"])
    x, level = aug(f["x_low"], f["noise_level"], generator=torch.Generator().manual_seed(106))
    assert torch.equal(level, f["noise_level"])
    close(x, f["x_aug"], 1e-6)
    # no level given: the original draws one per sample in 0..349 first, then the noise
    x, level = aug(f["x_low"], generator=torch.Generator().manual_seed(107))
    assert torch.equal(level, f["random_noise_level"])
    close(x, f["x_aug_random_level"], 1e-6)
