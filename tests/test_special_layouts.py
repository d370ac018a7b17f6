"""Each special family's official layout (shared/reference/layouts), written with random weights, loads strictly
with no config (the built-in preset, the depth model from its depth_model.* keys, the upscaler's low-res
schedule from low_scale_model.*) and runs one step of its command at a small size (slow: full-size networks)."""
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import LAYOUTS, REFERENCE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
INPUTS = REFERENCE / "special" / "inputs"

CASES = {
    "sd15_inpaint": ("inpaint", "sd1_inpaint", ["--init-img", INPUTS / "init.png", "--mask", INPUTS / "mask.png",
                                                "--ddim_steps", 1]),
    "sd2_inpaint": ("inpaint", "sd2_inpaint", ["--init-img", INPUTS / "init.png", "--mask", INPUTS / "mask.png",
                                               "--ddim_steps", 1]),
    "sd2_depth": ("depth2img", "sd2_depth", ["--init-img", INPUTS / "init.png", "--ddim_steps", 2, "--strength", 1.0]),
    "x4_upscaler": ("upscale", "x4_upscaler", ["--init-img", "{small}", "--ddim_steps", 1]),
}


@pytest.mark.parametrize("stem", CASES)
def test_official_layout_loads_strictly_and_runs_one_step(stem, tmp_path, capsys):
    import json

    import ldm
    from ldm import special_run
    from make_checkpoint import random_state, save

    command, family, argv = CASES[stem]
    layout = json.loads((LAYOUTS / f"{stem}.json").read_text())
    path = tmp_path / f"{stem}.safetensors"
    save(random_state(layout, torch.float16), path)
    model = ldm.load(path, device="cpu", dtype="float32")
    assert model.family == family and model.config.unet.in_channels > 4
    if stem == "sd2_depth":
        assert model.depth_model is not None  # MiDaS from the file's 368 depth_model.* keys
    if stem == "x4_upscaler":
        assert model.low_scale_model.max_noise_level == 350 and model.scale_factor == 0.08333
    del model
    Image.open(INPUTS / "lowres.png").resize((16, 16)).save(tmp_path / "small.png")
    argv = [str(a).format(small=tmp_path / "small.png") for a in argv]
    capsys.readouterr()
    code = special_run.main(command, [*argv, "--ckpt", str(path), "--device", "cpu", "--precision", "full",
                                      "--outdir", str(tmp_path / "out"), "--skip_grid", "--prompt", "a test"])
    out, err = capsys.readouterr()
    assert code == 0, err
    image = Image.open(tmp_path / "out" / "samples" / "00000.png")
    assert image.size == (64, 64)  # the 64x64 input, or 16x16 upscaled 4x
    if command == "depth2img":
        assert (tmp_path / "out" / "depth-0000.png").is_file()  # estimated by the checkpoint's MiDaS
