"""Choosing samplers by name end to end, per-sample seeds, and adding a sampler from outside the package."""
import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from conftest import FIXTURES
from ldm import generate
from ldm.images import read_parameters, read_settings, to_uint8
from ldm.pipeline import txt2img
from samplers.registry import REGISTRY, available, register
from samplers.step import Step

PROMPT = "a photograph of an astronaut riding a horse"


@pytest.fixture(scope="module")
def model():
    name = "sd2_tiny"
    return ldm.load(FIXTURES[name] / f"{name}.safetensors", config=FIXTURES[name] / f"{name}.yaml", device="cpu")


@pytest.mark.parametrize("sampler", available())
def test_per_sample_seeds_do_not_depend_on_the_batch(model, sampler):
    kw = dict(height=32, width=32, steps=4, sampler=sampler, seed_mode="per-sample")
    batch = to_uint8(txt2img(model, [PROMPT] * 4, n_samples=4, seed=100, **kw)[0]).astype(int)
    for i in (0, 3):
        alone = to_uint8(txt2img(model, PROMPT, n_samples=1, seed=100 + i, **kw)[0]).astype(int)
        assert np.abs(batch[i] - alone[0]).max() <= 1, f"image {i} of the batch differs from seed {100 + i} alone"


def test_original_seed_mode_shares_one_stream(model):
    kw = dict(height=32, width=32, steps=4, sampler="euler_a")
    batch = txt2img(model, [PROMPT] * 2, n_samples=2, seed=5, **kw)[0]
    second_alone = txt2img(model, PROMPT, n_samples=1, seed=6, **kw)[0]
    assert not torch.allclose(batch[1], second_alone[0])


def _cli(tmp_path, *flags):
    ckpt = FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"
    argv = ["--prompt", PROMPT, "--ckpt", str(ckpt), "--H", "32", "--W", "32", "--f", "2", "--ddim_steps", "4",
            "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--outdir", str(tmp_path), *flags]
    return generate.main("txt2img", argv)


@pytest.mark.parametrize("name,label", [("Euler a", "Euler a"), ("DPM++ 2M Karras", "DPM++ 2M Karras"),
                                        ("dpmpp_sde", "DPM++ SDE"), ("LMS", "LMS")])
def test_a1111_names_on_the_command_line(tmp_path, name, label):
    assert _cli(tmp_path, "--sampler", name) == 0
    png = next((tmp_path / "samples").glob("*.png"))
    assert f"Sampler: {label}," in read_parameters(png)


def test_schedule_flag_and_bad_sampler_choices(tmp_path, capsys):
    assert _cli(tmp_path, "--sampler", "heun", "--schedule", "exponential") == 0
    png = next((tmp_path / "samples").glob("*.png"))
    assert read_settings(png)["schedule"] == "exponential"
    capsys.readouterr()
    assert _cli(tmp_path, "--sampler", "warp drive") == 2
    assert _cli(tmp_path, "--sampler", "euler", "--ddim_eta", "0.5") == 2
    assert _cli(tmp_path, "--sampler", "ddim", "--schedule", "karras") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


@pytest.mark.parametrize("sampler", ["euler_a", "dpm2_a", "dpmpp_2s_a"])
def test_ancestral_samplers_draw_fresh_noise_by_default(tmp_path, model, sampler):
    """Without --ddim_eta an ancestral sampler keeps its own eta 1 (k-diffusion's and A1111's "Euler a"): with
    the original scripts' DDIM default of 0 it would be its deterministic twin, draw for draw."""
    twin = {"euler_a": "euler", "dpm2_a": "dpm2", "dpmpp_2s_a": "dpmpp_2s_a"}[sampler]
    kw = dict(height=32, width=32, steps=4, seed=3)
    ancestral, eta0 = (txt2img(model, PROMPT, sampler=sampler, eta=eta, **kw)[0] for eta in (None, 0.0))
    assert not torch.allclose(ancestral, eta0, atol=1e-3)
    assert torch.equal(ancestral, txt2img(model, PROMPT, sampler=sampler, eta=1.0, **kw)[0])
    if twin != sampler:
        assert torch.allclose(eta0, txt2img(model, PROMPT, sampler=twin, **kw)[0], atol=1e-5)
    assert _cli(tmp_path, "--sampler", sampler) == 0
    assert read_settings(next((tmp_path / "samples").glob("*.png")))["eta"] == 1.0


def test_ddim_stays_deterministic_by_default(tmp_path):
    assert _cli(tmp_path, "--sampler", "ddim") == 0
    assert read_settings(next((tmp_path / "samples").glob("*.png")))["eta"] == 0.0


def half_euler_steps(denoise, x, sigmas, *, generator=None):
    """A sampler written outside the package: two half Euler steps on one slope (for the test)."""
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        eps, x0 = denoise(x, sig[i])
        d = (x - x0) / sig[i]
        x_next = x + 0.5 * d * (sig[i + 1] - sig[i]) + 0.5 * d * (sig[i + 1] - sig[i])
        step = Step(index=i, total=len(sig) - 1, x=x, eps=eps, pred_x0=x0, x_next=x_next,
                    sigma=sig[i], sigma_next=sig[i + 1])
        yield step
        x = step.x_next


def test_a_new_sampler_is_one_function_and_one_register_line(tmp_path):
    try:
        register("half_euler", half_euler_steps)
        assert _cli(tmp_path / "new", "--sampler", "half_euler") == 0
        assert _cli(tmp_path / "euler", "--sampler", "euler") == 0
    finally:
        REGISTRY.pop("half_euler", None)
    new = read_settings(next((tmp_path / "new" / "samples").glob("*.png")))
    assert new["sampler"] == "half_euler"
    # half + half of an Euler step is an Euler step: the same image as the built-in one
    a = np.asarray(Image.open(next((tmp_path / "new" / "samples").glob("*.png"))))
    b = np.asarray(Image.open(next((tmp_path / "euler" / "samples").glob("*.png"))))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
