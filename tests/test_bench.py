"""tools/bench.py on the tiny reference configs: it runs, prints the table, writes valid JSON, and both sides
compute the same thing. No timing is asserted (the numbers are for people, on a quiet machine)."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import SHARED, fixture_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench  # noqa: E402

from models.config import PRESETS, from_yaml_dict  # noqa: E402
from models.text_encoders import text_encoder  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402


@pytest.mark.parametrize("cfg", [PRESETS["sd1"], replace(PRESETS["sd2"], parameterization="v"),
                                 PRESETS["x4_upscaler"], fixture_config("sd1_tiny"), fixture_config("sd2v_tiny")],
                         ids=["sd1", "sd2v", "x4_upscaler", "sd1_tiny", "sd2v_tiny"])
def test_original_config_reads_back(cfg):
    """The original-format config the bench hands to diffusers describes the same model to ldm's reader.
    A YAML names its text tower (the official ones here; diffusers builds the tower from cfg.text), and a
    tower it names is only described by files beside a YAML, so the tiny towers are compared by kind."""
    read = from_yaml_dict(bench.original_config(cfg))
    assert replace(read, text=cfg.text) == cfg
    assert read.extra == cfg.extra  # the upscaler's low-res noise schedule (extra is left out of ==)
    assert read.text == replace(text_encoder(cfg.text).default, layer=cfg.text.layer)


@pytest.mark.parametrize("family,expected", [
    # the published diffusers configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
    ("sd1", {"attention_head_dim": 8, "cross_attention_dim": 768, "use_linear_projection": False,
             "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}),
    ("sd2v", {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
              "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}),
    # and of stabilityai/stable-diffusion-x4-upscaler: the noise level as a class label, cross-attention only
    # (attn1 attends to the text) at the first three levels
    ("x4_upscaler", {"attention_head_dim": 8, "cross_attention_dim": 1024, "use_linear_projection": True,
                     "block_out_channels": [256, 512, 512, 1024], "layers_per_block": 2, "in_channels": 7,
                     "num_class_embeds": 1000, "only_cross_attention": [True, True, True, False],
                     "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3}),
])
def test_full_size_configs_convert_to_the_published_diffusers_ones(family, expected):
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    s = bench.spec(family, tiny=False, shared=SHARED)
    keys = {k: torch.empty(v[0], device="meta") for k, v in s.layout["keys"].items()
            if k.startswith("model.diffusion_model.")}
    config = create_unet_diffusers_config_from_ldm(s.original, keys)
    assert {k: config[k] for k in expected} == expected


def test_diffusers_tokenizer_from_open_clip_bpe_matches_ldm(tmp_path):
    prompts = [bench.PROMPT, "", "Hello,   WORLD!! café " * 20]
    ids = bench.write_clip_tokenizer(tmp_path)(prompts, padding="max_length", max_length=77, truncation=True,
                                              return_tensors="pt").input_ids
    assert torch.equal(ids, Tokenizer(pad_token=49407)(prompts))


def test_diffusers_tokenizer_pads_as_open_clip(tmp_path):
    """SD 2's towers pad with 0 ("!"). HF then treats every "!" of a prompt as that special token, which open_clip
    does not (a difference of diffusers' SD 2 pipelines, kept out of the bench's prompt)."""
    prompts = [bench.PROMPT, "", "Hello,   WORLD café " * 20]
    ids = bench.write_clip_tokenizer(tmp_path, pad_token_id=0)(prompts, padding="max_length", max_length=77,
                                                               truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, Tokenizer(pad_token=0)(prompts))
    assert "!" not in bench.PROMPT


def test_tiny_upscale_row_computes_what_diffusers_does(tmp_path, capsys):
    """ldm.pipeline.upscale and diffusers' StableDiffusionUpscalePipeline on the same tiny x4 weights, start code
    and noise-augmented low-res image: the same 4x image."""
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--rows", "upscale", "--dtypes", "float32", "--repeats", "1", "--warmup", "0",
                       "--steps", "2", "--shared", str(SHARED), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["label"] in capsys.readouterr().out and not doc["notes"]
    assert (row["size"], row["out_size"], row["steps"]) == (32, 128, 2)
    assert row["low_res_schedule_max_abs_diff"] <= 1e-6  # the original's "linear" is diffusers' "scaled_linear"
    assert row["max_abs_diff"] <= 1e-4, row
    assert row["output_max_abs"] > 0


def test_tiny_run_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--rows", "unet256,vae,text,txt2img,sd2", "--dtypes", "float32", "--repeats", "1",
                       "--warmup", "0", "--steps", "1", "--sd2-size", "512", "--shared", str(SHARED),
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ldm/diff" in printed
    doc = json.loads(out.read_text())
    machine = doc["machine"]
    assert machine["torch"] == torch.__version__ and machine["cpu"] and machine["cpu_count"] >= 1
    assert isinstance(machine["cpu_has_bf16"], bool)
    assert [r["row"] for r in doc["rows"]] == ["unet256", "vae", "text", "txt2img", "sd2"]
    for r in doc["rows"]:
        assert r["label"] in printed
        assert r["ldm"] > 0 and r["diffusers"] > 0 and len(r["runs"]["ldm"]) == 1
        # the same weights and inputs through both libraries: the same result, so the times compare like for like
        assert r["max_abs_diff"] <= 1e-4, r
        assert r["output_max_abs"] > 0
    # the achieved rates: the row's FLOPs over each side's median, and ldm's share of the machine's matmul rate
    rate = machine["matmul_tflops"]["float32"]
    assert rate > 0 and "TFLOP/s ldm" in printed
    for r in doc["rows"]:
        if r["row"] in ("unet256", "vae", "sd2"):
            assert r["flops"] > 0, r["row"]
            for side in ("ldm", "diffusers"):
                assert r["tflops"][side] == pytest.approx(r["flops"] / r[side] / 1e12)
            assert r["fraction_of_matmul"] == pytest.approx(r["tflops"]["ldm"] / rate)


def test_flop_count_of_matmuls_and_cpu_attention():
    """What the rates are computed from: 2 m k n for a matmul, and the CPU's fused attention counted as its
    two matmuls (4 B H Tq Tk d), as FlopCounterMode counts the math it replaces."""
    a, b = torch.randn(32, 48), torch.randn(48, 20)
    assert bench.count_flops(lambda: a @ b)[1] == 2 * 32 * 48 * 20
    q, k, v = torch.randn(2, 3, 64, 16), torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    out, flops = bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert out.shape == q.shape and flops == 4 * 2 * 3 * 64 * 40 * 16
    assert bench.count_flops(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)[1] == flops
    assert bench.matmul_tflops(torch.float32, torch.device("cpu"), 64) > 0


@pytest.mark.parametrize("side", ["ldm", "diffusers"])
@pytest.mark.parametrize("load_dtype", [None, "bfloat16"])
def test_load_child_reports_time_and_memory(side, load_dtype, tmp_path, capsys):
    """What each fresh load process runs (here in-process: a subprocess would import diffusers again)."""
    from make_checkpoint import save

    s = bench.spec("sd1", tiny=True, shared=SHARED)
    bench.prepare_load_dir(s, tmp_path)
    ckpt = tmp_path / "tiny-fp16.safetensors"
    save(bench.random_checkpoint(s, dtype=torch.float16), ckpt)
    extra = ["--load-dtype", load_dtype] if load_dtype else []
    assert bench.main(["--load-child", side, "--ckpt", str(ckpt), "--load-child-dir", str(tmp_path), *extra]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("LOAD_RESULT "))
    result = json.loads(line[len("LOAD_RESULT "):])
    # an fp16 file ready on the CPU in its default dtype, or the one asked for
    assert result["dtypes"] == [load_dtype or "float32"]
    assert result["seconds"] > 0 and result["peak_rss_gb"] >= result["rss_before_gb"] > 0


def test_unknown_row_is_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "unet1024"])


def test_compile_needs_a_warm_up():
    with pytest.raises(SystemExit):
        bench.parse_args(["--compile", "--warmup", "0"])


@pytest.mark.slow  # a couple of minutes of compiling on a 2-core CPU
def test_compiled_unet_row_computes_what_diffusers_does(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--rows", "unet256", "--dtypes", "float32", "--repeats", "1", "--compile",
                       "--shared", str(SHARED), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["label"].endswith("(ldm compiled)") and row["max_abs_diff"] <= 1e-4
