"""tools/train_tiny.py end to end at a few steps: what it writes is an ordinary checkpoint in the official SD 1.x
layout that ldm loads strictly, its metadata says how it was made, and a run stopped between checkpoints
resumes to the same bytes as one that was never stopped. (Quality: test_builtin.py, and its `slow` retrain.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ldm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import train_tiny  # noqa: E402
from shapes import COLOURS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FEW = ["--vae-steps", "4", "--unet-steps", "4", "--pool", "32", "--vae-batch", "4", "--unet-batch", "4",
       "--eval", "0", "--threads", "1", "--save-every", "2"]


def _train(tmp: Path, *extra: str) -> Path:
    assert train_tiny.main([*FEW, "--seed", "3", "--out", str(tmp / "model" / "tiny"), "--workdir", str(tmp / "work"),
                            *extra]) == 0
    return tmp / "model" / "tiny.safetensors"


def test_it_writes_a_checkpoint_ldm_loads_with_its_yaml_and_story(tmp_path):
    path = _train(tmp_path)
    model = ldm.load(path, device="cpu")  # the YAML and the text tower's config.json beside it, strict keys
    assert model.parameterization == "v" and model.config.vae.resolution == 32
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["seed"] == "3" and meta["command"].startswith("python tools/train_tiny.py --vae-steps 4")
    recipe = json.loads(meta["recipe"])
    assert recipe["unet_steps"] == 4 and recipe["vae_steps"] == 4
    assert set(json.loads(meta["wall_seconds"])) == {"vae", "latents", "unet"}
    gap, pair = json.loads(meta["closest_colours"])  # the autoencoder's closest colours, reported for the seed
    assert gap > 0 and all(c in COLOURS for c in pair.split("-"))
    assert (tmp_path / "work" / "loss.png").is_file()
    # the official file's non-network tensors: the DDPM schedule in float32, position ids
    state = load_file(str(path))
    assert state["alphas_cumprod"].dtype == torch.float32 and state["alphas_cumprod"].shape == (1000,)
    assert all(v.dtype == torch.float16 for k, v in state.items() if k.startswith("model.diffusion_model."))


def test_a_stopped_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    """Killed right after its stage-3 checkpoint at step 2 of 4, then run again with --resume: the same bytes as
    a run never stopped (data and noise are functions of the seed and the step, not of the process)."""
    whole = load_file(str(_train(tmp_path / "whole")))
    real = train_tiny.Checkpoints.save

    def save_then_die(self, state):
        real(self, state)
        if state.get("unet_step") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_tiny.Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "stopped")
    monkeypatch.setattr(train_tiny.Checkpoints, "save", real)
    resumed = load_file(str(_train(tmp_path / "stopped", "--resume")))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
