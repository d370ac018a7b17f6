"""Text towers named in a config are found from the files that describe them, as the original code finds
them (`CLIPTextModel.from_pretrained(folder)`, open_clip's model configs), never from a table of names.

The independent readers are transformers' CLIPTextConfig.from_pretrained and open_clip.get_model_config.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import ldm
from conftest import FIXTURES, fixture_tensors
from models.config import OPENCLIP_H, ConfigError, from_yaml, from_yaml_dict
from models.text_encoders import clip_from_hf_config, open_clip_model_config, openclip_from_model_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photograph of an astronaut riding a horse", ""]


def _cond_params(yaml_path: Path) -> dict:
    return yaml.safe_load(yaml_path.read_text())["model"]["params"]["cond_stage_config"]["params"]


def _hf_fields(folder: Path) -> dict:
    import transformers

    hf = transformers.CLIPTextConfig.from_pretrained(folder)
    return {"vocab_size": hf.vocab_size, "width": hf.hidden_size, "layers": hf.num_hidden_layers,
            "heads": hf.num_attention_heads, "intermediate_size": hf.intermediate_size,
            "max_positions": hf.max_position_embeddings, "act": hf.hidden_act}


def _open_clip_fields(doc: dict) -> dict:
    text = doc["text_cfg"]
    return {"vocab_size": text["vocab_size"], "width": text["width"], "heads": text["heads"],
            "layers": text["layers"], "context_length": text["context_length"], "embed_dim": doc["embed_dim"]}


def test_sd1_fixture_tower_is_what_from_pretrained_reads_in_its_folder():
    path = FIXTURES["sd1_tiny"] / "sd1_tiny.yaml"
    text = from_yaml(path).text
    expected = _hf_fields(path.parent / _cond_params(path)["version"])
    assert {k: getattr(text, k) for k in expected} == expected


@pytest.mark.parametrize("name", ["sd2_tiny", "sd2v_tiny"])
def test_sd2_fixture_tower_is_what_open_clip_registers_beside_the_yaml(name, monkeypatch):
    import open_clip
    from open_clip import factory

    path = FIXTURES[name] / f"{name}.yaml"
    arch = _cond_params(path)["arch"]
    # open_clip's registry is global: register the tower on copies the test hands back
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    open_clip.add_model_config(path.parent / f"{arch}.json")
    text = from_yaml(path).text
    expected = _open_clip_fields(open_clip.get_model_config(arch))
    assert {k: getattr(text, k) for k in expected} == expected and text.layer == "penultimate"


def test_open_clip_registry_is_read_as_open_clip_reads_it():
    """Without importing open_clip: every name in its registry gives what open_clip.get_model_config does."""
    import open_clip

    names = open_clip.list_models()
    assert "ViT-H-14" in names and len(names) > 20
    for name in names:
        assert open_clip_model_config(name) == open_clip.get_model_config(name), name
    assert openclip_from_model_config(open_clip.get_model_config("ViT-H-14")) == OPENCLIP_H


def test_official_towers_need_no_files(tmp_path):
    """v1-inference.yaml and v2-inference.yaml name openai/clip-vit-large-patch14 and ViT-H-14; nothing is
    beside them."""
    sd1 = yaml.safe_load((FIXTURES["sd1_tiny"] / "sd1_tiny.yaml").read_text())
    del sd1["model"]["params"]["cond_stage_config"]["params"]["version"]  # the embedder's default
    assert from_yaml_dict(sd1, tmp_path).text.width == 768
    sd2 = yaml.safe_load((FIXTURES["sd2_tiny"] / "sd2_tiny.yaml").read_text())
    sd2["model"]["params"]["cond_stage_config"]["params"]["arch"] = "ViT-H-14"
    assert from_yaml_dict(sd2, tmp_path).text == OPENCLIP_H


def test_a_whole_clip_model_config_gives_its_text_config(tmp_path):
    """openai/clip-vit-large-patch14's own config.json is a CLIPModel's, with the tower under text_config."""
    import transformers

    full = transformers.CLIPConfig(text_config={"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
                                                "intermediate_size": 96, "hidden_act": "gelu"})
    full.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip"
    text = clip_from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert {k: getattr(text, k) for k in _hf_fields(tmp_path)} == _hf_fields(tmp_path)


def _renamed(tmp_path: Path, name: str, key: str, new: str) -> Path:
    """The fixture's YAML under tmp_path with its tower renamed to `new`, and its tower file written there."""
    src = FIXTURES[name] / f"{name}.yaml"
    doc = yaml.safe_load(src.read_text())
    params = doc["model"]["params"]["cond_stage_config"]["params"]
    if key == "version":
        (tmp_path / new).mkdir(parents=True)
        shutil.copy(src.parent / params["version"] / "config.json", tmp_path / new / "config.json")
    else:
        shutil.copy(src.parent / f"{params['arch']}.json", tmp_path / f"{new}.json")
    params[key] = new
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


@pytest.mark.parametrize("name,key,new", [("sd1_tiny", "version", "my-org/a-new-clip"),
                                          ("sd2_tiny", "arch", "A-New-Tower-7")])
def test_a_tower_under_a_new_name_loads_from_its_files(tmp_path, name, key, new):
    config = _renamed(tmp_path, name, key, new)
    model = ldm.load(FIXTURES[name] / f"{name}.safetensors", config=config, device="cpu")
    t = fixture_tensors(name, "text_encoder")
    with torch.no_grad():
        tokens = model.tokenizer(PROMPTS)
        assert torch.equal(tokens, t["tokens"])
        assert (model.text_encoder(tokens) - t["cond"]).abs().max() <= 1e-4


@pytest.mark.parametrize("name,key,file", [("sd1_tiny", "version", "config.json"), ("sd2_tiny", "arch", ".json")])
def test_an_unknown_tower_is_a_one_line_error_that_says_where_it_looked(tmp_path, name, key, file):
    config = _renamed(tmp_path, name, key, "nowhere-tower")
    doc = yaml.safe_load(config.read_text())
    doc["model"]["params"]["cond_stage_config"]["params"][key] = "not-described"
    config.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        from_yaml(config)
    msg = str(e.value)
    assert "\n" not in msg and "'not-described'" in msg and str(tmp_path / "not-described") in msg
    assert file in msg and "put" in msg


def test_a_tower_ldm_does_not_build_is_refused():
    doc = open_clip_model_config("ViT-H-14")
    doc["text_cfg"]["ls_init_value"] = 1e-5
    with pytest.raises(ConfigError, match="ls_init_value"):
        openclip_from_model_config(doc)


def test_the_package_names_no_fixture():
    """Configs the tests have not seen load the same way as the fixtures: nothing in the code knows them."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for package in ("ldm", "models", "samplers", "weights")
            for p in sorted((ROOT / package).rglob("*")) if p.is_file() and "__pycache__" not in p.parts
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if "oracle" in line]
    assert hits == []
