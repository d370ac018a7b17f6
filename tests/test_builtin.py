"""The built-in model (weights/builtin/, trained by tools/train_tiny.py) draws what it is asked.

Each picture is read back with tools/shapes.py's plain pixel rule (the shape's pixels are those far from the
background colour; their mean colour, centroid and fill of their bounding box give colour, place and shape),
which is itself checked first against pictures drawn with known attributes. The captions include the
(colour, shape, place) combinations held out of training, which the model must compose.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import ldm
from ldm import builtin, pipeline
from ldm.images import read_settings, to_uint8
from samplers import drain
from samplers.registry import available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import shapes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# What the issue asks of the model, over all captions (held-out combinations included).
BARS = {"colour": 0.90, "place": 0.90, "shape": 0.75}
SIDE = 32


@pytest.fixture(scope="module")
def model():
    return ldm.load("builtin", device="cpu")


def rates(verdicts: list[dict]) -> dict:
    return {k: float(np.mean([v[k] for v in verdicts])) for k in ("colour", "shape", "place")}


def test_the_pixel_rule_reads_drawn_pictures():
    """The rule is right on the ground truth: every combination on every allowed background, drawn at the
    model's size with the training jitter, reads back as its caption."""
    rng = np.random.default_rng(7)
    wrong = []
    for colour, shape, place in shapes.combos(False) + shapes.combos(True):
        for background in shapes.backgrounds_for(colour):
            size = float(rng.uniform(*shapes.SIZE))
            dx, dy = rng.uniform(-shapes.JITTER, shapes.JITTER, size=2)
            scene = shapes.Scene(colour, shape, place, background, True, size, float(dx), float(dy))
            verdict = shapes.judge(shapes.draw(scene, SIDE), scene.caption)
            if not all(verdict.values()):
                wrong.append((scene.caption, verdict))
    assert not wrong, wrong


def test_the_pixel_rule_rejects_wrong_captions():
    scene = shapes.Scene("red", "circle", "at the top left", "black", True, 0.45)
    image = shapes.draw(scene, SIDE)
    assert shapes.judge(image, "a blue circle at the top left") == {"colour": False, "shape": True, "place": True}
    assert shapes.judge(image, "a red square at the bottom right")["place"] is False
    assert shapes.judge(image, "a red triangle at the top left")["shape"] is False
    blank = np.zeros((SIDE, SIDE, 3), np.uint8)
    assert not any(shapes.judge(blank, "a red circle in the center").values())


def test_the_shipped_file(model):
    """One safetensors file (<= 20 MB) and its YAML in the original schema, installed with the package; its
    metadata records the seed and the command that trained it."""
    assert builtin.CHECKPOINT.stat().st_size <= 20e6
    with safe_open(str(builtin.CHECKPOINT), "pt") as f:
        meta = f.metadata()
    assert meta["command"].startswith("python tools/train_tiny.py") and f"--seed {meta['seed']}" in meta["command"]
    assert model.config.vae.resolution == SIDE == builtin.native_size()
    assert model.family == "sd1"


def test_it_draws_what_it_is_asked_held_out_combinations_included(model):
    """The issue's bar: colour and place right in >= 90% of the images, shape in >= 75%, on fixed seeds, over
    every held-out combination (twice: with and without a named background) and 48 seen ones."""
    captions = shapes.evaluation_captions(np.random.default_rng(2026), n_seen=48)
    images = shapes.sample(model, [c for c, _ in captions], seed=1000)
    verdicts = [shapes.judge(image, c) for image, (c, _) in zip(images, captions)]
    got = rates(verdicts)
    held = rates([v for v, (_, held_out) in zip(verdicts, captions) if held_out])
    assert all(got[k] >= BARS[k] for k in BARS), (got, held)
    # composition: the held-out combinations (never seen in training) are drawn right most of the time too
    assert held["colour"] >= 0.75 and held["place"] >= 0.75, held


SAMPLER_CAPTIONS = ["a red circle at the top left", "a blue square at the bottom right on a white background",
                    "a yellow triangle in the center", "a green square at the top right on a black background",
                    "a white circle at the bottom left on a gray background", "a orange square in the center"]


# Steps per sampler: 20, except the linear multistep ones and DPM2's ancestral one at the original scripts' 50.
# On this model at 20 steps they get colour and place right in 75-82% of 60 captions (the others in 93-98%):
# PLMS's and LMS's extrapolation from past slopes overshoots the colour; at 50 all are at 92-95%.
STEPS = {"plms": 50, "lms": 50, "dpm2_a": 50}


@pytest.mark.parametrize("name", available())
def test_every_sampler_draws_the_captions(model, name):
    """Every sampler, at its usual step count for the family, makes pictures the rule reads as their captions
    (colour and place: what every sampler must get from the text)."""
    images = shapes.sample(model, SAMPLER_CAPTIONS, seed=5, sampler=name, steps=STEPS.get(name, 20))
    verdicts = [shapes.judge(image, c) for image, c in zip(images, SAMPLER_CAPTIONS)]
    assert sum(v["colour"] and v["place"] for v in verdicts) >= 5, (name, verdicts)


def test_the_step_generator_and_txt2img_agree(model):
    """The step-through API on the built-in model: 20 steps, each with its x0 prediction, ending at the latent
    txt2img decodes; the x0 predictions get closer to the end result as t falls."""
    gen = pipeline.make_generators(3, 1, "per-sample")
    steps = list(pipeline.txt2img_steps(model, "a purple circle at the bottom right", height=SIDE, width=SIDE,
                                        steps=20, sampler="ddim", scale=4.0, generator=gen))
    assert [s.index for s in steps] == list(range(20)) and steps[-1].total == 20
    expected = pipeline.txt2img(model, "a purple circle at the bottom right", seed=3, seed_mode="per-sample",
                                height=SIDE, width=SIDE, steps=20, sampler="ddim", scale=4.0)[0]
    image = pipeline.decode(model, steps[-1].x_next)
    assert torch.equal(image, expected)
    distances = [float((s.pred_x0 - steps[-1].x_next).norm()) for s in steps]
    assert distances[-1] < distances[len(distances) // 2] < distances[0]
    assert shapes.judge(to_uint8(image)[0], "a purple circle at the bottom right")["colour"]


def test_img2img_keeps_the_picture_at_low_strength_and_follows_the_text_at_high(model):
    scene = shapes.Scene("red", "square", "at the top left", "white", True, 0.44)
    init = torch.from_numpy(shapes.draw_batch([scene], SIDE))
    keep = pipeline.img2img(model, init, scene.caption, seed=1, strength=0.3, steps=20, sampler="ddim", scale=4.0)[0]
    assert all(shapes.judge(to_uint8(keep)[0], scene.caption).values())
    # the layout stays (the place), the text changes the colour
    new = "a blue square at the top left on a white background"
    changed = pipeline.img2img(model, init, new, seed=1, strength=0.75, steps=20, sampler="ddim", scale=4.0)[0]
    verdict = shapes.judge(to_uint8(changed)[0], new)
    assert verdict["colour"] and verdict["place"], verdict


def _command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_command_with_no_checkpoint_uses_it_and_says_so(tmp_path):
    """The README's first command, from a folder with nothing in it (no models/ldm/..., no ../shared): the
    built-in model, a one-line note, a PNG of its native size."""
    done = _command([str(ROOT / "tools" / "txt2img.py"), "--prompt", "a green square in the center", "--plms",
                     "--skip_grid", "--n_samples", "1", "--outdir", "out"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "using the built-in 32x32 model" in done.stdout + done.stderr
    pngs = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(pngs) == 2  # --n_iter defaults to 2, as in the original script
    assert all(Image.open(p).size == (SIDE, SIDE) for p in pngs)
    assert read_settings(pngs[0])["scale"] == builtin.SCALE  # its own guidance, SD's 7.5 with any other file


def test_its_own_guidance_scale_unless_one_is_given():
    """The commands' and the browser UI's default scale with the built-in model (SD's 7.5 overshoots its
    colours); an explicit --scale wins."""
    from ldm.options import build_parser, validate
    from ldm.ui.app import Page

    for command, flags, scale in (("txt2img", [], builtin.SCALE), ("txt2img", ["--scale", "7.5"], 7.5)):
        args = build_parser(command).parse_args(["--prompt", "a red circle in the center", "--ckpt", "builtin",
                                                 *flags])
        validate(command, args)
        assert args.scale == scale
    page = Page({str(builtin.CHECKPOINT): "builtin"}, ROOT, "cpu")
    assert page.scale("txt2img", 7.5) == page.scale("img2img", 5.0) == builtin.SCALE
    assert page.scale("inpaint", 7.5) == 7.5  # the special tabs are other models'


def test_it_is_named_builtin_and_is_the_default_of_load(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)  # no models/ldm/stable-diffusion-v1/model.ckpt here
    assert ldm.load(device="cpu").unet.state_dict().keys() == model.unet.state_dict().keys()
    done = _command(["-m", "ldm", "img2img", "--ckpt", "builtin", "--init-img", str(_picture(tmp_path)),
                     "--prompt", "a blue circle at the top left", "--strength", "0.5", "--ddim_steps", "10",
                     "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--outdir", "out"], tmp_path)
    assert done.returncode == 0, done.stderr
    pngs = list((tmp_path / "out" / "samples").glob("*.png"))
    assert len(pngs) == 1 and read_settings(pngs[0])["scale"] == builtin.SCALE


def _picture(folder: Path) -> Path:
    scene = shapes.Scene("blue", "circle", "at the top left", "gray", True, 0.44)
    path = folder / "init.png"
    Image.fromarray(shapes.draw(scene, SIDE)).save(path)
    return path


@pytest.mark.slow
def test_retraining_with_the_recorded_command_reproduces_the_quality(tmp_path):
    """The shipped file's recorded command, run again (about 15-30 minutes on 2 cores), gives a model that
    passes the same bar."""
    with safe_open(str(builtin.CHECKPOINT), "pt") as f:
        meta = f.metadata()
    args = meta["command"].split()[2:] + ["--out", str(tmp_path / "tiny"), "--workdir", str(tmp_path / "work"),
                                          "--eval", "0"]
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "train_tiny.py"), *args], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    retrained = ldm.load(tmp_path / "tiny.safetensors", device="cpu")
    captions = shapes.evaluation_captions(np.random.default_rng(2026), n_seen=48)
    images = shapes.sample(retrained, [c for c, _ in captions], seed=1000)
    got = rates([shapes.judge(image, c) for image, (c, _) in zip(images, captions)])
    assert all(got[k] >= BARS[k] for k in BARS), got
    assert json.loads(meta["recipe"]) == json.loads(_metadata(tmp_path / "tiny.safetensors")["recipe"])


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()
