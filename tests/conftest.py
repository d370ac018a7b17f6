"""Shared paths and loaders for the reference material in ../shared (read-only, never downloaded)."""
import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SHARED = Path(os.environ.get("LDM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE = SHARED / "reference"
LAYOUTS = REFERENCE / "layouts"
FIXTURES = {name: REFERENCE / "fixtures" / name for name in ("sd1_tiny", "sd2_tiny", "sd2v_tiny")}
# layout file stem -> the family our presets call it (512-base and 768-v share one layout)
LAYOUT_FAMILY = {"sd1": "sd1", "sd15_inpaint": "sd1_inpaint", "sd2_base": "sd2", "sd2_768_v": "sd2",
                 "sd2_inpaint": "sd2_inpaint", "sd2_depth": "sd2_depth", "x4_upscaler": "x4_upscaler"}

if not REFERENCE.is_dir():
    raise pytest.UsageError(f"reference data not found at {REFERENCE}; set LDM_SHARED to the shared/ folder")


@lru_cache(maxsize=None)
def layout(stem: str) -> dict:
    return json.loads((LAYOUTS / f"{stem}.json").read_text())


def layout_shapes(stem: str, prefix: str) -> dict:
    """{key without prefix: shape} for one component of an official layout."""
    return {k[len(prefix):]: tuple(v[0]) for k, v in layout(stem)["keys"].items() if k.startswith(prefix)}


def fixture_config(name: str):
    from models.config import from_yaml
    return from_yaml(FIXTURES[name] / f"{name}.yaml")


def copy_config(yaml_path: Path, folder: Path) -> Path:
    """Copy an original YAML into `folder` with the files that describe the text tower it names (the
    `version:` folder holding a config.json, or `<arch>.json`), as a user keeps them beside it."""
    import shutil

    import yaml

    params = yaml.safe_load(yaml_path.read_text())["model"]["params"]["cond_stage_config"].get("params") or {}
    for described in (params.get("version"), f"{params.get('arch')}.json"):
        source = yaml_path.parent / str(described)
        if source.is_dir():
            shutil.copytree(source, folder / described)
        elif source.is_file():
            shutil.copy(source, folder / described)
    return Path(shutil.copy(yaml_path, folder / yaml_path.name))


@lru_cache(maxsize=None)
def _fixture_state(name: str) -> dict:
    return load_file(FIXTURES[name] / f"{name}.safetensors")


def load_fixture_part(name: str, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in _fixture_state(name).items() if k.startswith(prefix)}


def fixture_tensors(name: str, stem: str) -> dict:
    return load_file(FIXTURES[name] / f"{stem}.safetensors")


def fixture_meta(name: str, stem: str) -> dict:
    return json.loads((FIXTURES[name] / f"{stem}.json").read_text())


def diffusers_vae_twin(ours):
    """diffusers' AutoencoderKL holding `ours`'s weights, built and converted by diffusers' own
    single-file code from an original-format config and checkpoint."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     create_vae_diffusers_config_from_ldm)

    cfg = ours.cfg
    checkpoint = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    ddconfig = {"ch": cfg.ch, "ch_mult": list(cfg.ch_mult), "in_channels": cfg.in_channels,
                "out_ch": cfg.out_ch, "z_channels": cfg.z_channels, "num_res_blocks": cfg.num_res_blocks}
    original_config = {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": {
        "params": {"embed_dim": cfg.embed_dim, "ddconfig": ddconfig}}}}}
    dconfig = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    theirs = DiffusersVAE(**dconfig).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, dconfig), strict=True)
    return theirs


@pytest.fixture
def packed_calls(monkeypatch):
    """The input shapes oneDNN's packed convolution was called with."""
    calls, real = [], torch.ops.mkldnn._convolution_pointwise

    def spy(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", spy)
    return calls


@pytest.fixture(scope="module")
def one_thread():
    """One OpenMP thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    machines are shared, and two threads competing with other jobs run several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
