"""txt2img / img2img commands end to end on the tiny fixture checkpoints.

The whole-script fixtures (`txt2img.png`, made by the original scripts' code) are the reference for
the images; files, numbering, metadata and error handling are checked against what the flags ask for.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, fixture_meta, fixture_tensors
from ldm import cli, generate
from ldm.images import read_parameters, read_settings

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
FAST = ["--H", "32", "--W", "32", "--ddim_steps", "2"]  # 2 steps: timesteps 1 and 501


pytestmark = pytest.mark.usefixtures("one_thread")


def _file(name: str, ext: str) -> str:
    return str(FIXTURES[name] / f"{name}.{ext}")


def model_flags(name: str = "sd1_tiny", ext: str = "safetensors") -> list[str]:
    # CPU float32 as the fixtures; no --f: the tiny VAE downsamples by 2, and --f defaults to the model's
    return ["--ckpt", _file(name, ext), "--config", _file(name, "yaml"), "--precision", "full", "--device", "cpu"]


def run(capsys, command: str, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = generate.main(command, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def sha10(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---- txt2img: files, grid, numbering, metadata ----------------------------------------------------------

def test_txt2img_files_grid_numbering_metadata(tmp_path, capsys):
    out = tmp_path / "out"
    argv = model_flags() + FAST + ["--prompt", PROMPT, "--n_samples", 2, "--n_iter", 2, "--seed", 7, "--outdir", out]
    code, stdout, err = run(capsys, "txt2img", argv)
    assert code == 0, err
    assert listing(out / "samples") == [f"{i:05d}.png" for i in range(4)]
    assert listing(out) == ["grid-0000.png", "samples"]
    assert "Your samples are ready and waiting for you here" in stdout and str(out) in stdout

    samples = [pixels(out / "samples" / f"{i:05d}.png") for i in range(4)]
    assert all(s.shape == (32, 32, 3) for s in samples)
    # torchvision's grid: n_rows (default n_samples = 2) images per row, 2 px padding; batches in order
    grid = pixels(out / "grid-0000.png")
    assert grid.shape == (70, 70, 3)
    for k, (top, left) in enumerate([(2, 2), (2, 36), (36, 2), (36, 36)]):
        np.testing.assert_array_equal(grid[top:top + 32, left:left + 32], samples[k])
    assert not np.array_equal(samples[0], samples[1])  # each image of a batch has its own noise

    s = read_settings(out / "samples" / "00003.png")
    expected = {"command": "txt2img", "prompt": PROMPT, "negative_prompt": "", "seed": 7, "iteration": 1,
                "index_in_batch": 1, "batch": 0, "batch_size": 2, "n_samples": 2, "n_iter": 2,
                "fixed_code": False, "sampler": "ddim", "steps": 2, "eta": 0.0, "scale": 7.5, "H": 32, "W": 32,
                "C": 4, "f": 2,  # the model's, though no flag named them
                "ckpt": _file("sd1_tiny", "safetensors"), "model_hash": sha10(_file("sd1_tiny", "safetensors")),
                "config": _file("sd1_tiny", "yaml"), "device": "cpu", "dtype": "float32", "prediction": "eps",
                "ema": False, "torch_version": torch.__version__}
    assert {k: s.get(k) for k in expected} == expected
    assert s["ldm_version"]
    text = read_parameters(out / "samples" / "00003.png")
    assert text.splitlines()[0] == PROMPT
    assert text.splitlines()[1] == (f"Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 7, Size: 32x32, "
                                    f"Model hash: {sha10(_file('sd1_tiny', 'safetensors'))}, Model: sd1_tiny")
    assert read_settings(out / "grid-0000.png")["grid"] == {"images": 4, "n_rows": 2}

    # the same command again: numbering goes on, nothing is overwritten, the bytes are the same
    before = {p: p.read_bytes() for p in [*(out / "samples").iterdir(), out / "grid-0000.png"]}
    code, _, err = run(capsys, "txt2img", argv)
    assert code == 0, err
    assert listing(out / "samples") == [f"{i:05d}.png" for i in range(8)]
    assert listing(out) == ["grid-0000.png", "grid-0001.png", "samples"]
    assert all(p.read_bytes() == b for p, b in before.items())
    for i in range(4):
        assert (out / "samples" / f"{i + 4:05d}.png").read_bytes() == before[out / "samples" / f"{i:05d}.png"]
    assert (out / "grid-0001.png").read_bytes() == before[out / "grid-0000.png"]

    # another seed: other images
    code, _, err = run(capsys, "txt2img", argv[:-6] + ["--n_iter", 1, "--seed", 8, "--outdir", out])
    assert code == 0, err
    assert not np.array_equal(pixels(out / "samples" / "00008.png"), samples[0])


def test_skip_grid_and_skip_save(tmp_path, capsys):
    base = model_flags() + FAST + ["--n_samples", 1, "--n_iter", 1]
    code, _, err = run(capsys, "txt2img", base + ["--skip_save", "--outdir", tmp_path / "a"])
    assert code == 0, err
    assert listing(tmp_path / "a") == ["grid-0000.png"]
    code, _, err = run(capsys, "txt2img", base + ["--skip_grid", "--outdir", tmp_path / "b"])
    assert code == 0, err
    assert listing(tmp_path / "b") == ["samples"] and listing(tmp_path / "b" / "samples") == ["00000.png"]


def test_from_file_batches_prompts(tmp_path, capsys):
    prompts = ["a red cube", "a blue sphere", "a green cone"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, "txt2img", model_flags() + FAST + [
        "--from-file", tmp_path / "prompts.txt", "--n_samples", 2, "--n_iter", 1,
        "--negative-prompt", "blurry", "--outdir", out])
    assert code == 0, err
    names = listing(out / "samples")
    assert names == ["00000.png", "00001.png", "00002.png"]
    settings = [read_settings(out / "samples" / n) for n in names]
    # chunks of n_samples as the original; the short last chunk runs as a batch of one
    assert [(s["prompt"], s["batch"], s["index_in_batch"], s["batch_size"]) for s in settings] == [
        (prompts[0], 0, 0, 2), (prompts[1], 0, 1, 2), (prompts[2], 1, 0, 1)]
    assert all(s["negative_prompt"] == "blurry" for s in settings)
    assert read_parameters(out / "samples" / "00002.png").splitlines()[:2] == [prompts[2], "Negative prompt: blurry"]
    assert pixels(out / "grid-0000.png").shape == (70, 70, 3)  # 3 images, 2 per row


# ---- the original script's output ----------------------------------------------------------------------

@pytest.mark.parametrize("name, ext, extra", [
    ("sd1_tiny", "ckpt", ["--fixed_code"]),  # the fixture draws its start code first, as --fixed_code does
    ("sd2_tiny", "safetensors", []),         # with one batch the per-iteration draw is that same first draw
    ("sd2v_tiny", "safetensors", []),
])
def test_matches_original_txt2img_script(tmp_path, capsys, name, ext, extra):
    meta = fixture_meta(name, "txt2img")
    sampler = {"PLMSSampler": ["--plms"], "DDIMSampler": []}[meta["sampler"]]
    argv = model_flags(name, ext) + sampler + extra + [
        "--prompt", meta["prompt"], "--H", meta["H"], "--W", meta["W"], "--n_samples", meta["n_samples"],
        "--n_iter", meta["n_iter"], "--ddim_steps", meta["ddim_steps"], "--scale", meta["scale"],
        "--ddim_eta", meta["ddim_eta"], "--seed", meta["seed"], "--outdir", tmp_path, "--skip_grid"]
    code, _, err = run(capsys, "txt2img", argv)
    assert code == 0, err
    ours = pixels(tmp_path / "samples" / "00000.png").astype(np.int16)
    ref_png = pixels(FIXTURES[name] / "txt2img.png").astype(np.int16)
    ref = fixture_tensors(name, "txt2img")["image_uint8_hwc"].numpy().astype(np.int16)
    for what, reference in (("txt2img.png", ref_png), ("image_uint8_hwc", ref)):
        diff = np.abs(ours - reference)
        print(f"{name} vs {what}: max {diff.max()} level, {np.count_nonzero(diff)} of {diff.size} values differ")
        assert diff.max() <= 1
    s = read_settings(tmp_path / "samples" / "00000.png")
    assert s["prediction"] == meta["parameterization"] and s["sampler"] == ("plms" if sampler else "ddim")


def test_prediction_flag_overrides_the_config(tmp_path, capsys):
    base = model_flags("sd2v_tiny") + FAST + ["--n_samples", 1, "--n_iter", 1, "--skip_grid"]
    code, _, err = run(capsys, "txt2img", base + ["--outdir", tmp_path / "v"])
    assert code == 0, err
    code, stdout, err = run(capsys, "txt2img", base + ["--prediction", "eps", "--outdir", tmp_path / "eps"])
    assert code == 0, err
    assert "using eps as asked (--prediction)" in stdout
    assert read_settings(tmp_path / "eps" / "samples" / "00000.png")["prediction"] == "eps"
    assert not np.array_equal(pixels(tmp_path / "v" / "samples" / "00000.png"),
                              pixels(tmp_path / "eps" / "samples" / "00000.png"))


# ---- img2img -------------------------------------------------------------------------------------------

@pytest.fixture()
def init_png(tmp_path) -> Path:
    path = tmp_path / "init.png"
    Image.open(FIXTURES["sd1_tiny"] / "txt2img.png").convert("RGB").save(path)
    return path


def test_img2img_end_to_end(tmp_path, capsys, init_png):
    from ldm import load, pipeline
    from ldm.images import load_image, to_uint8

    base = model_flags() + ["--init-img", init_png, "--prompt", PROMPT, "--ddim_steps", 4, "--n_iter", 1,
                            "--seed", 5]
    code, stdout, err = run(capsys, "img2img", base + ["--strength", 0.5, "--n_samples", 2, "--outdir", tmp_path / "a"])
    assert code == 0, err
    assert "target t_enc is 2 steps" in stdout
    assert listing(tmp_path / "a") == ["grid-0000.png", "samples"]
    assert listing(tmp_path / "a" / "samples") == ["00000.png", "00001.png"]
    s = read_settings(tmp_path / "a" / "samples" / "00001.png")
    expected = {"command": "img2img", "strength": 0.5, "t_enc": 2, "init_image": str(init_png),
                "init_image_sha256": hashlib.sha256(init_png.read_bytes()).hexdigest(), "H": 64, "W": 64,
                "seed": 5, "steps": 4, "sampler": "ddim", "scale": 5.0, "index_in_batch": 1}
    assert {k: s.get(k) for k in expected} == expected
    assert "Denoising strength: 0.5" in read_parameters(tmp_path / "a" / "samples" / "00001.png")

    # the command is the library's img2img: same seed, same images
    model = load(_file("sd1_tiny", "safetensors"), device="cpu", dtype="float32")
    image, _ = load_image(init_png)
    ref = to_uint8(pipeline.img2img(model, image, PROMPT, seed=5, n_samples=2, strength=0.5, steps=4,
                                    sampler="ddim", scale=5.0)[0])
    for i in range(2):
        np.testing.assert_array_equal(pixels(tmp_path / "a" / "samples" / f"0000{i}.png"), ref[i])

    code, _, err = run(capsys, "img2img", base + ["--strength", 0.9, "--n_samples", 1, "--outdir", tmp_path / "b"])
    assert code == 0, err
    assert not np.array_equal(pixels(tmp_path / "b" / "samples" / "00000.png"), ref[0])


def test_img2img_plms_and_resized_input(tmp_path, capsys, init_png):
    odd = tmp_path / "odd.png"
    Image.open(init_png).resize((70, 67)).save(odd)
    argv = model_flags() + ["--init-img", odd, "--plms", "--ddim_steps", 4, "--n_samples", 1, "--outdir", tmp_path]
    code, stdout, err = run(capsys, "img2img", argv)
    assert code == 0, err
    assert "resized odd.png from 70x67 to 64x64" in stdout
    assert pixels(tmp_path / "samples" / "00000.png").shape == (64, 64, 3)
    s = read_settings(tmp_path / "samples" / "00000.png")
    assert (s["sampler"], s["strength"], s["t_enc"]) == ("plms", 0.75, 3)
    assert "Sampler: PLMS" in read_parameters(tmp_path / "samples" / "00000.png")


# ---- user errors: one line, exit code 2, checked before any weights are read ---------------------------

BAD_FLAGS = [
    ("txt2img", ["--f", "8", "--H", "500"], "--H 500 is not a multiple of 8; use 496 or 504"),
    ("txt2img", ["--f", "8", "--W", "4"], "--W 4 is not a multiple of 8; use 8"),
    ("txt2img", ["--W", "0"], "--W 0: must be a size in pixels"),
    ("txt2img", ["--scale", "nan"], "--scale nan: must be a finite number"),
    ("txt2img", ["--prompt", "caf\udce9"], "--prompt: is not valid UTF-8 text"),  # b"caf\xe9" in a UTF-8 argv
    ("txt2img", ["--ddim_eta", "inf"], "--ddim_eta inf: must be a finite number"),
    ("img2img", ["--init-img", "{init}", "--strength", "nan"], "--strength nan: must be a finite number"),
    ("txt2img", ["--ddim_steps", "0"], "--ddim_steps 0"),
    ("txt2img", ["--ddim_steps", "3"], "--ddim_steps 3"),  # uniform spacing would reach t = 1000
    ("txt2img", ["--ddim_steps", "ten"], "invalid int value"),
    ("txt2img", ["--n_samples", "0"], "--n_samples 0"),
    ("txt2img", ["--n_iter", "0"], "--n_iter 0"),
    ("txt2img", ["--plms", "--ddim_eta", "0.5"], "--ddim_eta must be 0"),
    ("txt2img", ["--plms", "--sampler", "ddim"], "--plms and --sampler ddim disagree"),
    ("txt2img", ["--sampler", "euler_x"], "unknown sampler"),
    ("txt2img", ["--laion400m"], "--laion400m is not supported"),
    ("txt2img", ["--dpm_solver"], "--dpm_solver is not supported"),
    ("txt2img", ["--bogus"], "unrecognized arguments: --bogus"),
    ("txt2img", ["--seed", "-1"], "--seed -1"),
    ("txt2img", ["--dtype", "int8"], "unknown dtype"),
    ("txt2img", ["--from-file", "{tmp}/none.txt"], "none.txt: no such file"),
    ("txt2img", ["--config", "{tmp}/none.yaml"], "none.yaml: no such file"),
    ("img2img", ["--init-img", "{init}", "--strength", "1.5"], "--strength 1.5"),
    ("img2img", ["--init-img", "{init}", "--strength", "-0.1"], "--strength -0.1"),
    ("img2img", [], "--init-img is required"),
    ("img2img", ["--init-img", "{tmp}/none.png"], "none.png: no such file"),
    ("img2img", ["--init-img", "{tmp}/text.png"], "cannot be read as an image"),
    ("img2img", ["--init-img", "{tmp}/huge.png"], "is 5000x5000; an init image may have at most"),
    ("img2img", ["--init-img", "{tmp}/bomb.png"], "decompression bomb"),
    ("img2img", ["--init-img", "{tmp}/cut.png"], "cannot be decoded"),
    ("txt2img", ["--config", "{tmp}/garbage.yaml"], "garbage.yaml"),
    ("img2img", ["--init-img", "{init}", "--H", "512"], "--H is not an img2img flag"),
    ("img2img", ["--init-img", "{init}", "--fixed_code"], "--fixed_code has no effect in img2img"),
]


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0]


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that is only a header claiming width x height: PIL reads the size without any pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("command, flags, message", BAD_FLAGS)
def test_bad_flags_fail_before_loading(tmp_path, capsys, init_png, command, flags, message):
    (tmp_path / "text.png").write_text("not an image")
    _png_header(tmp_path / "huge.png", 5000, 5000)  # over the 4096x4096 ceiling, refused from the header
    _png_header(tmp_path / "bomb.png", 20000, 20000)  # over PIL's own bomb limit: it raises when opening
    (tmp_path / "cut.png").write_bytes(Path(init_png).read_bytes()[:200])
    (tmp_path / "garbage.yaml").write_bytes(bytes(range(256)) * 4)
    flags = [f.format(tmp=tmp_path, init=init_png) for f in flags]
    # a checkpoint that does not exist: the message must be about the flag, so the flag was checked first
    code, out, err = run(capsys, command, flags + ["--ckpt", tmp_path / "missing.ckpt", "--outdir", tmp_path / "o"])
    assert_one_line_error(code, err, message)
    assert "missing.ckpt" not in err and "Loading model" not in out
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_says_where_to_get_one(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "txt2img", ["--ckpt", tmp_path / "sd-v1-4.ckpt", "--outdir", tmp_path / "o"])
    assert_one_line_error(code, err, "sd-v1-4.ckpt: no such file; download an official checkpoint",
                          "huggingface.co/", "--ckpt")
    monkeypatch.chdir(tmp_path)  # the original's default path, relative to where it runs
    from ldm import builtin  # a checkout without the built-in model's files: the original default, missing

    monkeypatch.setattr(builtin, "CHECKPOINT", tmp_path / "no-builtin" / "tiny.safetensors")
    code, _, err = run(capsys, "img2img", ["--init-img", FIXTURES["sd1_tiny"] / "txt2img.png"])
    assert_one_line_error(code, err, "models/ldm/stable-diffusion-v1/model.ckpt: no such file")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_a_gpu(tmp_path, capsys):
    code, _, err = run(capsys, "txt2img", ["--device", "cuda", "--ckpt", tmp_path / "missing.ckpt"])
    assert_one_line_error(code, err, "--device cuda")


@pytest.mark.parametrize("flags, message", [
    (["--f", "8"], "--f 8 does not match the model: its VAE downsamples by 2; pass --f 2 or leave --f out"),
    (["--C", "3"], "--C 3 does not match the model: its latents have 4 channels; pass --C 4 or leave --C out"),
])
def test_flags_that_must_match_the_model(tmp_path, capsys, flags, message):
    code, out, err = run(capsys, "txt2img", model_flags() + FAST + flags + ["--outdir", tmp_path])
    assert_one_line_error(code, err, message)
    assert "Loading model" in out  # only the loaded model knows its factor and channels
    assert listing(tmp_path) == []


def test_flags_that_match_the_model_may_be_given(tmp_path, capsys):
    code, _, err = run(capsys, "txt2img", model_flags() + FAST + ["--f", 2, "--C", 4, "--n_samples", 1, "--n_iter", 1,
                                                                  "--skip_grid", "--outdir", tmp_path])
    assert code == 0, err
    assert {k: read_settings(tmp_path / "samples" / "00000.png")[k] for k in ("C", "f")} == {"C": 4, "f": 2}


def test_size_is_checked_against_the_factor_in_use(tmp_path, capsys):
    # without --f, the model's own factor (2 here) after loading: 36 is whole latent pixels, 35 is not
    code, _, err = run(capsys, "txt2img", model_flags() + FAST + ["--H", 35, "--outdir", tmp_path])
    assert_one_line_error(code, err, "--H 35 is not a multiple of 2; use 34 or 36", "this model's VAE downsamples by 2")
    code, _, err = run(capsys, "txt2img", model_flags() + FAST + ["--H", 36, "--n_samples", 1, "--n_iter", 1,
                                                                  "--outdir", tmp_path / "no_f"])
    assert code == 0, err
    assert pixels(tmp_path / "no_f" / "grid-0000.png").shape == (36, 32, 3)
    # an explicit --f is the multiple instead: 36 is whole latent pixels at f = 2, 35 is not
    code, _, err = run(capsys, "txt2img", model_flags() + FAST + ["--f", 2, "--H", 35, "--outdir", tmp_path])
    assert_one_line_error(code, err, "--H 35 is not a multiple of 2; use 34 or 36", "--f 2")
    code, _, err = run(capsys, "txt2img", model_flags() + FAST + ["--f", 2, "--H", 36, "--n_samples", 1,
                                                                  "--n_iter", 1, "--outdir", tmp_path])
    assert code == 0, err
    assert pixels(tmp_path / "grid-0000.png").shape == (36, 32, 3)


def test_a_factor_that_does_not_divide_8_is_checked_after_loading():
    # a stand-in for a model whose VAE downsamples by 16 (no such fixture): checked once it is loaded
    model = SimpleNamespace(family="sd1", config=SimpleNamespace(vae=SimpleNamespace(downsampling_factor=16,
                                                                                     embed_dim=4)))
    args = generate.build_parser("txt2img").parse_args(["--H", "520", "--W", "512"])
    with pytest.raises(generate.UsageError, match="--H 520 is not a multiple of 16; use 512 or 528 "
                                                  r"\(this model's VAE downsamples by 16\)"):
        generate.check_model(model, args)
    generate.check_model(model, generate.build_parser("txt2img").parse_args(["--H", "512", "--W", "512"]))


def test_the_run_plan_is_a_frozen_record(tmp_path, init_png):
    argv = model_flags() + ["--init-img", str(init_png), "--n_samples", "3", "--sampler", "Euler a"]
    plan = generate.validate("img2img", generate.build_parser("img2img").parse_args(argv))
    assert dataclasses.is_dataclass(plan)
    assert (plan.spec.name, plan.batches, plan.height, plan.width) == ("euler_a", [3 * [generate.build_parser(
        "img2img").get_default("prompt")]], 64, 64)
    assert plan.init.sha256 == hashlib.sha256(init_png.read_bytes()).hexdigest() and plan.init.note is None
    assert plan.ckpt == Path(_file("sd1_tiny", "safetensors")) and plan.placement.device == torch.device("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.height = 32


def test_help(capsys):
    assert generate.main("txt2img", ["--help"]) == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--plms", "--from-file", "--fixed_code", "--ddim_eta", "--n_rows"))
    assert generate.main("img2img", ["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--init-img" in text and "--strength" in text and "PLMS img2img works here" in text
    commands = cli.build_parser().format_help()
    assert "txt2img" in commands and "img2img" in commands


# ---- the entry points ----------------------------------------------------------------------------------

def test_entry_points_run_the_same_code(tmp_path, capsys):
    argv = [str(a) for a in model_flags() + FAST + ["--n_samples", 1, "--n_iter", 1, "--skip_grid"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"tool": [sys.executable, str(ROOT / "tools" / "txt2img.py")],
            "module": [sys.executable, "-m", "ldm", "txt2img"]}
    for name, cmd in runs.items():
        done = subprocess.run(cmd + argv + ["--outdir", str(tmp_path / name)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Your samples are ready" in done.stdout
    code, _, err = run(capsys, "txt2img", argv + ["--outdir", tmp_path / "inprocess"])
    assert code == 0, err
    reference = (tmp_path / "inprocess" / "samples" / "00000.png").read_bytes()
    for name in runs:
        assert (tmp_path / name / "samples" / "00000.png").read_bytes() == reference


def test_steps_through_the_module_entry_takes_the_models_factor(tmp_path, capsys):
    # `python -m ldm steps` on the f = 2 fixture, no --f: the filmstrip is at the asked size and records f = 2
    capsys.readouterr()
    argv = ["steps", *model_flags(), "--H", 32, "--W", 48, "--ddim_steps", 2, "--outdir", tmp_path]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    settings = read_settings(tmp_path / "steps-0000.png")
    assert (settings["H"], settings["W"], settings["f"], settings["shown_steps"]) == (32, 48, 2, [0, 1])
    assert pixels(tmp_path / "steps-0000.png").shape == (2 * 34 + 2, 2 * 50 + 2, 3)  # 2 steps x (decoded, preview)
    code = cli.main([str(a) for a in ["steps", *model_flags(), "--f", 8, *FAST, "--outdir", tmp_path / "bad"]])
    assert_one_line_error(code, capsys.readouterr().err, "--f 8 does not match the model")
    assert listing(tmp_path / "bad") == []


def test_every_command_reports_user_errors_alike(tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "missing.safetensors")
    assert cli.main(["steps", "--every", "0", "--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "--every 0: must be at least 1")


def test_run_command_exit_codes(capsys):
    from ldm.errors import INTERRUPTED, USER_ERROR, one_line, run_command

    def raising(e):
        def command():
            raise e
        return command

    assert run_command(lambda: 0) == 0
    assert run_command(raising(KeyboardInterrupt())) == INTERRUPTED == 130
    capsys.readouterr()
    assert run_command(raising(FileNotFoundError(2, "No such file or directory", "/x/y.png"))) == USER_ERROR == 2
    assert capsys.readouterr().err == "error: /x/y.png: No such file or directory\n"
    assert one_line(ValueError("two\n   lines")) == "two lines"
    with pytest.raises(RuntimeError):  # not a user error: a bug keeps its traceback
        run_command(raising(RuntimeError("bug")))
    with pytest.raises(ValueError):  # nor does a bare ValueError (`a, b = (1, 2, 3)`), only the project's own
        run_command(raising(ValueError("too many values to unpack (expected 2)")))
    from ldm.images import ImageError
    assert run_command(raising(ImageError("x.png: not an image"))) == USER_ERROR


def test_a_nan_weight_is_one_line_that_names_the_step_and_writes_nothing(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(_file("sd1_tiny", "safetensors"))
    key = "model.diffusion_model.out.2.weight"  # the UNet's last convolution: every prediction
    state[key][0, 0, 0, 0] = float("nan")
    save_file(state, tmp_path / "damaged.safetensors")
    flags = ["--ckpt", tmp_path / "damaged.safetensors", "--config", _file("sd1_tiny", "yaml"), "--device", "cpu"]
    for command in ("txt2img", "steps"):
        capsys.readouterr()
        argv = [str(a) for a in flags + FAST + ["--outdir", tmp_path / command]]
        code = generate.main(command, argv) if command == "txt2img" else cli.main(["steps", *argv])
        _, err = capsys.readouterr()
        assert_one_line_error(code, err, "step 1 of", "NaN or Inf", "UNet's weights")
        assert not (tmp_path / command).exists() or not any((tmp_path / command).rglob("*.png"))


def test_an_unwritable_outdir_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    argv = model_flags() + FAST + ["--outdir", tmp_path / "file" / "sub"]  # under a file: no folder can be made
    code, out, err = run(capsys, "txt2img", argv)
    assert_one_line_error(code, err, "cannot be written here", "pass another --outdir")
    assert "Loading model" not in out


def test_a_size_that_cannot_fit_in_memory_is_refused_before_sampling(tmp_path, capsys):
    code, out, err = run(capsys, "txt2img", model_flags() + ["--H", 100000, "--W", 100000, "--outdir", tmp_path])
    assert_one_line_error(code, err, "--H 100000 --W 100000 with 3 sample(s) per batch needs about", "fits")
    assert listing(tmp_path) == []


def test_the_memory_ceiling_suggests_sizes_that_fit():
    """The suggestions are checked against the same estimate: the offered size fits, 64 more does not.
    (How good the estimate is, is measured by tools/measure_memory.py, not asserted here.)"""
    from ldm import memory
    from models.config import PRESETS

    cfg, gib = PRESETS["sd1"], 2**30
    sizes = dict(unet_itemsize=4, vae_itemsize=4)
    assert memory.refusal(cfg, 3, 512, 512, 16 * gib, torch.device("cpu"), vae_tile=None, **sizes) is None
    line = memory.refusal(cfg, 3, 512, 100000, 16 * gib, torch.device("cpu"), vae_tile=None, **sizes)
    print(line)
    h, w = (int(v) for v in line.split("fits")[0].split(": ")[-1].replace("--H", "").replace("--W", "").split())
    assert h == 512 and w % 64 == 0  # the strip keeps the height asked for and gives up width
    assert memory.estimate(cfg, 3, h, w, **sizes).peak <= 16 * gib < memory.estimate(cfg, 3, h, w + 64, **sizes).peak
    assert "--n_samples 1" not in line  # one sample of that size does not fit either
    # one 2048x2048 image fits in 12 GB only with the decode tiled; on a GPU --lowvram is named too
    line = memory.refusal(cfg, 1, 2048, 2048, 12 * gib, torch.device("cuda"), vae_tile=None, **sizes)
    assert "--vae-tiling would make this size fit" in line and "--lowvram" in line
    assert memory.refusal(cfg, 1, 2048, 2048, 12 * gib, torch.device("cuda"), vae_tile=64, **sizes) is None
