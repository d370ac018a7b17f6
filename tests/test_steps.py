"""Watching an image form: the linear latent preview and the `python -m ldm steps` filmstrip."""

import torch
from PIL import Image

from conftest import FIXTURES
from ldm.filmstrip import main
from ldm.images import read_settings
from ldm.preview import fit_latent_rgb


def test_preview_fit_recovers_a_linear_decoder():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    decoded = torch.einsum("bchw,cd->bdhw", latents, weight) + bias[:, None, None]
    decoded = decoded.repeat_interleave(8, -1).repeat_interleave(8, -2)  # f = 8, as the SD VAE
    fit = fit_latent_rgb(latents, decoded)
    assert fit.rms < 1e-5
    assert torch.allclose(fit.weight, weight, atol=1e-4) and torch.allclose(fit.bias, bias, atol=1e-4)
    assert fit(latents, scale=8).shape == decoded.shape


def test_steps_command_writes_the_filmstrip_and_animation(tmp_path, capsys):
    ckpt = FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt"
    args = ["--prompt", "a red apple", "--ckpt", str(ckpt), "--H", "64", "--W", "64", "--f", "2",
            "--ddim_steps", "10", "--every", "4", "--n_samples", "2", "--outdir", str(tmp_path)]
    assert main(args) == 0
    png, gif = tmp_path / "steps-0000.png", tmp_path / "steps-0000.gif"
    settings = read_settings(png)
    assert settings["shown_steps"] == [0, 4, 8, 9] and settings["preview_fit_rms"] >= 0
    strip = Image.open(png)
    # 4 shown steps across, 2 rows (decoded, preview) per sample; 64 px images with 2 px padding
    assert strip.size == (4 * 66 + 2, 4 * 66 + 2)
    assert Image.open(gif).n_frames == 4
    assert main(args) == 0 and (tmp_path / "steps-0001.png").exists()  # numbered on, never overwritten
    assert "RMS error" in capsys.readouterr().out
