"""inpaint, depth2img and upscale end to end against the original scripts' outputs
(../shared/reference/special/*/e2e_*), through the commands with each fixture's own argv, and the
commands' handling of bad input (one line, exit code 2, before the weights are read)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, REFERENCE
from ldm import pipeline, special_run
from ldm.images import read_parameters, read_settings
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = REFERENCE / "special"
E2E = {"sd15_inpaint_tiny": "e2e_inpaint", "sd2_inpaint_tiny": "e2e_inpaint", "sd2_depth_tiny": "e2e_depth2img",
       "x4_upscaler_tiny": "e2e_upscale"}
COMMAND = {"e2e_inpaint": "inpaint", "e2e_depth2img": "depth2img", "e2e_upscale": "upscale"}
INPUTS = SPECIAL / "inputs"


pytestmark = pytest.mark.usefixtures("one_thread")


def meta(name: str) -> dict:
    return json.loads((SPECIAL / name / f"{E2E[name]}.json").read_text())


def ckpt(name: str) -> list[str]:
    return ["--ckpt", str(SPECIAL / name / f"{name}.safetensors"), "--config", str(SPECIAL / name / f"{name}.yaml")]


def run(capsys, command: str, argv: list) -> tuple[int, str, str]:
    capsys.readouterr()
    code = special_run.main(command, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB")).astype(np.int16)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", E2E)
def test_the_command_with_the_fixture_argv_makes_the_scripts_images(name, tmp_path, capsys, monkeypatch):
    """The fixture's own argv (paths relative to shared/reference), as tools/<command>.py takes it; the
    latents the command decodes are the scripts' `samples` and every PNG is within one level."""
    m, f = meta(name), load_file(SPECIAL / name / f"{E2E[name]}.safetensors")
    decoded = []
    real_decode = pipeline.decode
    monkeypatch.setattr(special_run.pipeline, "decode",
                        lambda model, z: decoded.append(z) or real_decode(model, z))
    monkeypatch.chdir(REFERENCE)
    code, out, err = run(capsys, COMMAND[E2E[name]], m["argv"] + ["--outdir", tmp_path, "--device", "cpu"])
    assert code == 0, err
    latents = torch.cat(decoded)
    err_latent = rel(latents, f["samples"])
    print(f"{name}: latents {err_latent:.1e} of absmax {f['samples'].abs().max():.1f}")
    assert err_latent <= 1e-4
    for i, png in enumerate(m["images"]):
        diff = np.abs(pixels(tmp_path / "samples" / f"{i:05d}.png") - pixels(SPECIAL / name / png))
        print(f"{name} {png}: max {diff.max()} level, {np.count_nonzero(diff)} of {diff.size} values differ")
        assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 1000
    if name == "sd2_depth_tiny":  # the depth the script shows first, from the depth map given
        depth = pixels(tmp_path / "depth-0000.png")[..., 0]
        assert np.array_equal(depth, f["depth_display_uint8"].numpy())
    s = read_settings(tmp_path / "samples" / "00000.png")
    assert (s["command"], s["seed"], s["steps"], s["eta"], s["scale"]) == (
        COMMAND[E2E[name]], m["cli"]["seed"], m["cli"]["ddim_steps"], m["cli"]["ddim_eta"], m["cli"]["scale"])


def test_the_upscaler_through_the_python_api():
    """ldm.pipeline.upscale_steps with the script's numpy start code: 75 steps are DDIM's 77."""
    import ldm
    from ldm.images import load_image

    name = "x4_upscaler_tiny"
    f, prompt = load_file(SPECIAL / name / "e2e_upscale.safetensors"), meta(name)["cli"]["prompt"]
    model = ldm.load(SPECIAL / name / f"{name}.safetensors", config=SPECIAL / name / f"{name}.yaml", device="cpu")
    image, _ = load_image(INPUTS / "lowres.png", multiple=1)
    x_T = pipeline.NumpyStartCodes(33, 1).draw((1, 4, 32, 32))
    assert torch.equal(x_T, f["x_T"])
    g = torch.Generator().manual_seed(33)
    steps = list(pipeline.upscale_steps(model, image, prompt, noise_level=20, generator=g, x_T=x_T))
    assert len(steps) == 77 and [s.t for s in steps[:2]] == [989, 976]
    assert rel(steps[-1].x_next, f["samples"]) <= 1e-4
    assert rel(pipeline.decode(model, steps[-1].x_next), f["decoded"]) <= 1e-4


# ---- the same code through the other entry points --------------------------------------------------------

def test_tools_scripts_and_the_module_entry(tmp_path):
    name = "x4_upscaler_tiny"
    base = ckpt(name) + ["--init-img", INPUTS / "lowres.png", "--ddim_steps", 2, "--seed", 5, "--device", "cpu",
                         "--skip_grid", "--prompt", "a toy"]
    entries = {"tool": [sys.executable, ROOT / "tools" / "upscale.py"],
               "module": [sys.executable, "-m", "ldm", "upscale"]}
    for out, entry in entries.items():
        r = subprocess.run([*map(str, entry), *map(str, base), "--outdir", str(tmp_path / out)], capture_output=True,
                           text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr
    a, b = (pixels(tmp_path / out / "samples" / "00000.png") for out in entries)
    assert np.array_equal(a, b) and a.shape == (128, 128, 3)
    assert "Noise level: 20" in read_parameters(tmp_path / "tool" / "samples" / "00000.png")


def test_every_sampler_runs_the_concat_models():
    """Conditioning by concatenation sits in the denoiser: every registered sampler runs inpainting (c_concat)
    and the upscaler (c_concat and the class label) unchanged."""
    import ldm
    from samplers.registry import REGISTRY

    inpaint = ldm.load(SPECIAL / "sd2_inpaint_tiny" / "sd2_inpaint_tiny.safetensors", device="cpu")
    upscaler = ldm.load(SPECIAL / "x4_upscaler_tiny" / "x4_upscaler_tiny.safetensors", device="cpu")
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    for name in REGISTRY:
        a = pipeline.inpaint(inpaint, image, mask, "a", steps=2, sampler=name, eta=0.0, seed=1)[0]
        b = pipeline.upscale(upscaler, image[..., :8, :8], "a", steps=2, sampler=name, seed=1)[0]
        assert a.shape == (1, 3, 16, 16) and b.shape == (1, 3, 32, 32), name
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name


# ---- behaviour -------------------------------------------------------------------------------------------

def test_inpaint_defaults_metadata_mask_resize_and_alpha(tmp_path, capsys):
    base = ckpt("sd15_inpaint_tiny") + ["--init-img", INPUTS / "init.png", "--prompt", "a door", "--ddim_steps", 2,
                                        "--device", "cpu", "--skip_grid"]
    big = tmp_path / "mask.png"
    Image.open(INPUTS / "mask.png").resize((128, 128), Image.NEAREST).save(big)
    code, out, err = run(capsys, "inpaint", base + ["--mask", big, "--outdir", tmp_path / "a"])
    assert code == 0, err
    assert "resized the mask mask.png from 128x128 to the image's 64x64" in out
    s = read_settings(tmp_path / "a" / "samples" / "00000.png")
    assert (s["eta"], s["scale"], s["seed"], s["mask_from_alpha"]) == (1.0, 7.5, 0, False)  # runwayml's defaults
    assert "Denoising strength: 1.0, Mask blur: 0" in read_parameters(tmp_path / "a" / "samples" / "00000.png")
    # the same mask as the init image's transparency: the same image
    rgba = Image.open(INPUTS / "init.png").convert("RGBA")
    rgba.putalpha(Image.eval(Image.open(INPUTS / "mask.png"), lambda v: 255 - v))
    rgba.save(tmp_path / "alpha.png")
    argv = [a if a != INPUTS / "init.png" else tmp_path / "alpha.png" for a in base]
    code, _, err = run(capsys, "inpaint", argv + ["--mask-from-alpha", "--outdir", tmp_path / "b"])
    assert code == 0, err
    code, _, err = run(capsys, "inpaint", base + ["--mask", INPUTS / "mask.png", "--outdir", tmp_path / "c"])
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "b" / "samples" / "00000.png"),
                          pixels(tmp_path / "c" / "samples" / "00000.png"))


def test_sd2_inpaint_and_depth_defaults_and_odd_sizes(tmp_path, capsys):
    odd = tmp_path / "odd.png"
    Image.open(INPUTS / "init.png").resize((70, 67)).save(odd)
    code, out, err = run(capsys, "inpaint", ckpt("sd2_inpaint_tiny") + [
        "--init-img", odd, "--mask", INPUTS / "mask.png", "--ddim_steps", 2, "--device", "cpu",
        "--outdir", tmp_path / "i", "--n_iter", 2])
    assert code == 0, err
    assert "resized odd.png from 70x67 to 64x64 (multiples of 8)" in out
    assert sorted(p.name for p in (tmp_path / "i" / "samples").iterdir()) == ["00000.png", "00001.png"]
    s = read_settings(tmp_path / "i" / "samples" / "00001.png")
    assert (s["eta"], s["scale"], s["iteration"]) == (0.0, 10.0, 1)  # SD 2 streamlit's defaults
    code, out, err = run(capsys, "depth2img", ckpt("sd2_depth_tiny") + [
        "--init-img", INPUTS / "init.png", "--depth-map", INPUTS / "depth.png", "--ddim_steps", 4,
        "--strength", 1.0, "--device", "cpu", "--outdir", tmp_path / "d", "--skip_grid"])
    assert code == 0, err
    s = read_settings(tmp_path / "d" / "samples" / "00000.png")
    assert (s["t_enc"], s["scale"], s["strength"]) == (3, 9.0, 1.0)  # strength 1: steps - 1, from pure noise


# ---- user errors -----------------------------------------------------------------------------------------

def _bad_inputs(tmp: Path) -> list:
    (tmp / "text.png").write_text("not an image")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp / "rgb.png")
    Image.new("L", (64, 64), 7).save(tmp / "flat.png")
    init, mask, depth, low = (INPUTS / n for n in ("init.png", "mask.png", "depth.png", "lowres.png"))
    inpaint = ckpt("sd2_inpaint_tiny") + ["--init-img", init]
    depth2img = ckpt("sd2_depth_tiny") + ["--init-img", init]
    upscale = ckpt("x4_upscaler_tiny") + ["--init-img", low]
    sd1 = ["--ckpt", FIXTURES["sd1_tiny"] / "sd1_tiny.safetensors"]
    return [
        ("inpaint", inpaint, "inpaint needs a mask: pass --mask FILE"),
        ("inpaint", inpaint + ["--mask", tmp / "none.png"], "none.png: no such file"),
        ("inpaint", inpaint + ["--mask", tmp / "text.png"], "text.png: cannot be read as an image"),
        ("inpaint", inpaint + ["--mask-from-alpha"], "has no alpha channel"),
        ("inpaint", inpaint + ["--mask", mask, "--mask-from-alpha"], "pass one of them"),
        ("inpaint", inpaint + ["--mask", mask, "--seed", 2 ** 32], "--seed 4294967296"),
        ("inpaint", ckpt("x4_upscaler_tiny") + ["--init-img", init, "--mask", mask],
         "is a x4_upscaler checkpoint; inpaint needs an inpainting checkpoint"),
        ("depth2img", depth2img + ["--depth-map", tmp / "rgb.png"],
         "is a RGB image; --depth-map takes an 8- or 16-bit"),
        ("depth2img", depth2img + ["--depth-map", tmp / "flat.png"], "holds one value everywhere"),
        ("depth2img", depth2img + ["--depth-map", depth, "--strength", 1.5], "--strength 1.5: must be in [0.0, 1.0]"),
        ("depth2img", depth2img + ["--depth-map", depth, "--strength", -0.1], "--strength -0.1"),
        ("depth2img", depth2img + ["--depth-map", depth, "--strength", "nan"], "--strength nan: must be a finite"),
        ("depth2img", depth2img + ["--depth-map", depth, "--strength", 0.01], "runs no step"),
        ("depth2img", ["--init-img", init, "--depth-map", depth], "--ckpt is required"),
        ("upscale", upscale + ["--noise_level", 351], "--noise_level 351: must be in 0..350"),
        ("upscale", upscale + ["--noise_level", -1], "--noise_level -1"),
        ("upscale", upscale + ["--noise_level", "0.5"], "invalid int value"),
        ("upscale", ckpt("x4_upscaler_tiny"), "--init-img is required"),
        ("upscale", sd1 + ["--init-img", low],
         "is a sd1 checkpoint; upscale needs the x4 upscaler checkpoint (x4-upscaler-ema.ckpt); use it with "
         "`python -m ldm txt2img`"),
        ("depth2img", ckpt("sd15_inpaint_tiny") + ["--init-img", init],
         "is a sd1_inpaint checkpoint; depth2img needs the SD 2 depth checkpoint (512-depth-ema.ckpt); use it "
         "with `python -m ldm inpaint`"),
    ]


def test_bad_input_is_one_line_before_the_weights(tmp_path, capsys, monkeypatch):
    import ldm.runtime

    monkeypatch.setattr(ldm.runtime, "load", lambda *a, **k: pytest.fail("weights were read"))
    for command, argv, message in _bad_inputs(tmp_path):
        code, out, err = run(capsys, command, argv + ["--outdir", tmp_path / "o", "--device", "cpu"])
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert message in lines[0], (message, lines[0])
        assert "Loading model" not in out


def test_txt2img_with_an_inpainting_file_names_the_command(tmp_path, capsys):
    from ldm import generate

    capsys.readouterr()
    code = generate.main("txt2img", ["--ckpt", str(SPECIAL / "sd2_inpaint_tiny" / "sd2_inpaint_tiny.safetensors"),
                                     "--outdir", str(tmp_path), "--device", "cpu", "--H", "32", "--W", "32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "is a sd2_inpaint checkpoint" in err and "`python -m ldm inpaint` (tools/inpaint.py)" in err


def test_steps_filmstrip_of_a_special_command(tmp_path, capsys):
    from ldm import cli

    capsys.readouterr()
    code = cli.main(["steps", "upscale", *ckpt("x4_upscaler_tiny"), "--init-img", str(INPUTS / "lowres.png"),
                     "--ddim_steps", "10", "--every", "4", "--device", "cpu", "--outdir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "steps shown: [0, 4, 8, 9]" in out
    s = read_settings(tmp_path / "steps-0000.png")
    assert (s["of"], s["f"], s["H"]) == ("upscale", 4, 128)


def test_other_samplers_keep_their_own_eta(tmp_path, capsys):
    """Only DDIM takes the script's eta by default (SD 1.5 inpainting: 1.0): PLMS must have 0, euler_a its 1."""
    base = ckpt("sd15_inpaint_tiny") + ["--init-img", INPUTS / "init.png", "--mask", INPUTS / "mask.png",
                                        "--ddim_steps", 2, "--device", "cpu", "--skip_grid"]
    for sampler in ("plms", "euler_a"):
        code, _, err = run(capsys, "inpaint", base + ["--sampler", sampler, "--outdir", tmp_path / sampler])
        assert code == 0, err
        assert read_settings(tmp_path / sampler / "samples" / "00000.png")["eta"] is None
