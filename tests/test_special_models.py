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


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_depth_conditioning():
    """The original LatentDepth2ImageDiffusion.get_input with a fixed depth: bicubic to the latent size, then
    per sample to [-1, 1]; the class method's epsilon 0.001 is an option (the e2e scripts have none)."""
    from ldm.depth import normalize_depth
    from ldm.pipeline import encode_image

    f, model = tensors("sd2_depth_tiny", "depth_conditioning"), special_model("sd2_depth_tiny")
    images = f["jpg_bhwc"].permute(0, 3, 1, 2)
    z = encode_image(model, images, torch.Generator().manual_seed(113))
    close(z, f["z"], 1e-5)
    resized = torch.nn.functional.interpolate(f["depth"], size=(32, 32), mode="bicubic", align_corners=False)
    close(resized, f["depth_resized"], 1e-6)
    close(normalize_depth(f["depth"], (32, 32), eps=0.001), f["c_concat"], 1e-6)
    # without the epsilon (the scripts): the wide 16-bit map barely moves, the narrow one by ~3e-4
    assert (normalize_depth(f["depth"], (32, 32))[0] - f["c_concat"][0]).abs().max() < 1e-5


def test_midas_input_is_addmidas():
    """AddMiDaS('dpt_hybrid'): 'minimal' resize toward 384 keeping the aspect, multiples of 32, bicubic."""
    from ldm.depth import estimate_depth, midas_input, midas_size

    assert midas_size(64, 64) == (384, 384) and midas_size(512, 512) == (384, 384)
    assert midas_size(512, 768) == (384, 576) and midas_size(768, 512) == (576, 384)
    assert midas_size(400, 1000) == (384, 960)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    m = midas_input(x)
    assert m.shape == (1, 3, 256, 384)  # the scale nearer 1: 384 / 96 (bicubic overshoots [-1, 1], as cv2)

    class Stub(torch.nn.Module):  # the depth model's contract: [-1, 1] images in, [B, 1, H, W] out
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, images):
            self.seen = images
            return images.mean(1, keepdim=True) * self.w

    model = special_model("sd2_depth_tiny")
    model.depth_model = Stub()
    depth = estimate_depth(model, x)
    assert depth.shape == (1, 1, 256, 384) and torch.equal(model.depth_model.seen, m)
