"""ldm.load and `python -m ldm inspect`: official layouts end to end, variants, EMA, errors, memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ldm
from conftest import FIXTURES, LAYOUT_FAMILY, copy_config, fixture_tensors, layout
from ldm.loading import detect_prediction
from ldm.placing import converted, place_now
from models.config import PRESETS
from models.text_encoders import text_encoder
from models.unet import UNetModel
from models.vae import AutoencoderKL
from weights import CheckpointError, split_components
from weights.pages import PageReleaser

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ldm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT)


def _one_line_error(result):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("stem", sorted(LAYOUT_FAMILY))
def test_every_official_key_is_loaded_or_recognised(stem):
    """The whole file, not one component: each key goes into a network built on meta for the detected
    family, or is a recognised extra (schedule buffers, EMA, depth model...); nothing is unknown."""
    shapes = {k: tuple(v[0]) for k, v in layout(stem)["keys"].items()}
    parts = split_components({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert parts.unknown == []
    cfg = PRESETS[LAYOUT_FAMILY[stem]]
    encoder = text_encoder(cfg.text)
    with torch.device("meta"):
        nets = {"unet": UNetModel(cfg.unet), "vae": AutoencoderKL(cfg.vae), encoder.component: encoder.module(cfg.text)}
    assert set(parts.parts) == set(nets)
    for name, net in nets.items():
        part = encoder.normalize(parts.parts[name]) if name == encoder.component else parts.parts[name]
        assert {k: tuple(v.shape) for k, v in part.items()} == {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name,ext", [(n, ".safetensors") for n in FIXTURES] + [("sd1_tiny", ".ckpt")])
def test_loaded_model_reproduces_original_outputs(name, ext):
    path = FIXTURES[name] / f"{name}{ext}"
    model = ldm.load(path, config=FIXTURES[name] / f"{name}.yaml", device="cpu")
    assert model.family == ("sd1" if name == "sd1_tiny" else "sd2")
    assert model.parameterization == ("v" if name == "sd2v_tiny" else "eps")
    assert model.scale_factor == 0.18215
    f = fixture_tensors(name, "unet_forward")
    t = fixture_tensors(name, "text_encoder")
    with torch.no_grad():
        assert (model.unet(f["x"], f["t"], f["context"]) - f["out"]).abs().max() <= 1e-4
        tokens = model.tokenizer(["a photograph of an astronaut riding a horse", ""])
        assert torch.equal(tokens, t["tokens"])
        assert (model.text_encoder(tokens) - t["cond"]).abs().max() <= 1e-4
    # the checkpoint's own schedule buffers are what the sampler gets
    assert torch.equal(model.alphas_cumprod, load_file(FIXTURES[name] / f"{name}.safetensors")["alphas_cumprod"])


def test_float32_file_on_cpu_stays_memory_mapped():
    path = FIXTURES["sd1_tiny"] / "sd1_tiny.safetensors"
    model = ldm.load(path, device="cpu", dtype="float32")
    ranges = PageReleaser(path).ranges
    assert ranges, "the file should be mapped"
    weight = model.unet.input_blocks[0][0].weight
    assert any(lo <= weight.data_ptr() < hi for lo, hi in ranges)


@pytest.mark.parametrize("src,dst", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                     (torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_conversion_on_load_equals_a_plain_cast(src, dst):
    t = (torch.randn(3 * (1 << 20) + 5, generator=torch.Generator().manual_seed(0)) * 100).to(src)
    t[:4] = torch.tensor([float("inf"), float("-inf"), 1e-7, 0.0])  # overflow, underflow, zero
    scratch = torch.empty(1 << 20)
    for x in (t, t[1:].view(-1, 2)[:, 0], t.view(-1)[: 1 << 20].view(1024, 1024).t()):  # and strided views
        out = converted(x, torch.device("cpu"), dst, scratch)
        assert out.dtype == dst and out.shape == x.shape
        assert torch.equal(out, x.to(dst))


def _dtypes(module) -> set:
    return {p.dtype for p in module.parameters()}


@pytest.mark.parametrize("name", ["sd1_tiny", "sd2_tiny"])
def test_parts_a_command_does_not_run_are_placed_on_their_first_call(name):
    """The VAE encoder (unused by txt2img) and the text block SD 2 skips keep the file's tensors until
    they run; then they are converted like the rest, and give the same results as placed eagerly."""
    path, yaml = FIXTURES[name] / f"{name}.safetensors", FIXTURES[name] / f"{name}.yaml"
    model = ldm.load(path, config=yaml, device="cpu", dtype="bfloat16")
    skipped = model.text_encoder.skipped_blocks()
    assert len(skipped) == (1 if name == "sd2_tiny" else 0)
    assert _dtypes(model.unet) == _dtypes(model.vae.decoder) == {torch.bfloat16}
    assert _dtypes(model.vae.encoder) == _dtypes(model.vae.quant_conv) == {torch.float32}  # the file's
    assert all(_dtypes(b) == {torch.float32} for b in skipped)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        model.text_encoder(model.tokenizer(["a cat"]))
        lazy_mean = model.vae.encode(image.bfloat16()).mean
    assert _dtypes(model.vae.encoder) == _dtypes(model.vae.quant_conv) == {torch.bfloat16}
    assert not hasattr(model.vae.encoder, "pending_placement")
    assert all(_dtypes(b) == {torch.float32} for b in skipped)  # never run, never converted
    eager = ldm.load(path, config=yaml, device="cpu", dtype="bfloat16")
    place_now(eager.vae), place_now(eager.text_encoder)
    assert _dtypes(eager.vae) == _dtypes(eager.text_encoder) == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(eager.vae.encode(image.bfloat16()).mean, lazy_mean)


def _copy_without_config(tmp_path, name, transform=lambda sd: sd, suffix=".safetensors"):
    sd = transform(dict(load_file(FIXTURES[name] / f"{name}.safetensors")))
    out = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    else:
        torch.save({"state_dict": sd}, out)
    return out


def test_config_beside_the_checkpoint_is_used_and_missing_config_gives_a_clear_error(tmp_path):
    path = _copy_without_config(tmp_path, "sd1_tiny")
    with pytest.raises(CheckpointError) as e:  # the tiny file does not fit the full-size sd1 preset
        ldm.load(path, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "sd1" in msg and "--config" in msg
    copy_config(FIXTURES["sd1_tiny"] / "sd1_tiny.yaml", tmp_path)
    model = ldm.load(path, device="cpu")
    assert any("sd1_tiny.yaml" in n for n in model.notes)


def test_clip_key_variants_and_fp16_files_load(tmp_path):
    def variant(sd):
        sd = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd.items()
              if not k.endswith("position_ids")}
        return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}

    path = _copy_without_config(tmp_path, "sd1_tiny", variant)
    model = ldm.load(path, config=FIXTURES["sd1_tiny"] / "sd1_tiny.yaml", device="cpu", dtype="float32")
    t = fixture_tensors("sd1_tiny", "text_encoder")
    with torch.no_grad():
        assert (model.text_encoder(t["tokens"]) - t["cond"]).abs().max() <= 5e-2  # fp16 weights
    assert next(model.unet.parameters()).dtype == torch.float32


def test_ema_weights_are_selected_on_request(tmp_path):
    def with_ema(sd):
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k] + 0.5
        sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(7, dtype=torch.int32)
        return sd

    cfg = FIXTURES["sd1_tiny"] / "sd1_tiny.yaml"
    path = _copy_without_config(tmp_path, "sd1_tiny", with_ema, suffix=".ckpt")
    plain = ldm.load(path, config=cfg, device="cpu")
    ema = ldm.load(path, config=cfg, device="cpu", ema=True)
    w = "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(ema.unet.state_dict()[w], plain.unet.state_dict()[w] + 0.5)
    info = json.loads(_cli("inspect", path, "--json").stdout)
    assert info["ema"] is True and info["recognised_extra_keys"]["model_ema"] == 2 + len(plain.unet.state_dict())
    with pytest.raises(CheckpointError):
        ldm.load(FIXTURES["sd1_tiny"] / "sd1_tiny.safetensors", config=cfg, device="cpu", ema=True)


def test_separate_vae_file_replaces_the_checkpoints_own(tmp_path):
    sd = load_file(FIXTURES["sd1_tiny"] / "sd1_tiny.safetensors")
    vae = {k[len("first_stage_model."):]: v + 0.25 for k, v in sd.items() if k.startswith("first_stage_model.")}
    vae["loss.logvar"] = torch.zeros(())  # some published VAE files keep their training loss
    save_file(vae, str(tmp_path / "vae.safetensors"))
    cfg = FIXTURES["sd1_tiny"] / "sd1_tiny.yaml"
    model = ldm.load(FIXTURES["sd1_tiny"] / "sd1_tiny.safetensors", config=cfg, device="cpu",
                     vae=tmp_path / "vae.safetensors")
    assert torch.equal(model.vae.state_dict()["decoder.conv_in.weight"], vae["decoder.conv_in.weight"])
    with pytest.raises(CheckpointError, match="VAE-only"):
        ldm.load(tmp_path / "vae.safetensors", device="cpu")


def test_prediction_type_from_flag_config_or_probe():
    sd2 = FIXTURES["sd2_tiny"]
    assert ldm.load(sd2 / "sd2_tiny.safetensors", config=sd2 / "sd2_tiny.yaml", device="cpu",
                    prediction="v").parameterization == "v"

    class Stub(torch.nn.Module):  # a "UNet" whose answer at t=999 we choose
        def __init__(self, sign):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.cfg, self.sign = PRESETS["sd2"].unet, sign

        def forward(self, x, t, context):
            return self.sign * x * 4  # v-like: mean(out - x) = -2.5 ; eps-like: +1.5

    assert detect_prediction(Stub(-1), 1024)[0] == "v"
    assert detect_prediction(Stub(+1), 1024)[0] == "eps"


def test_inspect_reports_the_file(tmp_path):
    result = _cli("inspect", FIXTURES["sd2v_tiny"] / "sd2v_tiny.safetensors", "--json", "--load")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    sd = load_file(FIXTURES["sd2v_tiny"] / "sd2v_tiny.safetensors")
    assert info["family"] == "sd2" and info["dtypes"] == {"float32": len(sd)}
    assert set(info["parameters"]) == {"unet", "vae", "openclip_text"}
    assert info["parameters"]["unet"] == sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))
    assert info["ema"] is False and info["load_seconds"] > 0 and info["peak_rss_mb"] > 0
    assert any("sd2v_tiny.yaml" in n for n in info["notes"])


def test_bad_files_get_one_line_errors(tmp_path):
    good = FIXTURES["sd1_tiny"] / "sd1_tiny.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in _one_line_error(_cli("inspect", cut))
    zipped = tmp_path / "cut.ckpt"
    zipped.write_bytes((FIXTURES["sd1_tiny"] / "sd1_tiny.ckpt").read_bytes()[:100_000])
    assert "cut.ckpt" in _one_line_error(_cli("inspect", zipped))
    assert "missing.ckpt" in _one_line_error(_cli("inspect", tmp_path / "missing.ckpt"))
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    assert "notes.ckpt" in _one_line_error(_cli("inspect", text))
    wrong = _cli("inspect", FIXTURES["sd2_tiny"] / "sd2_tiny.safetensors", "--load",
                 "--config", FIXTURES["sd1_tiny"] / "sd1_tiny.yaml")
    assert "sd2" in _one_line_error(wrong) and "sd1" in _one_line_error(wrong)


@pytest.mark.slow
def test_full_size_fp16_load_keeps_peak_rss_near_the_file_size(tmp_path):
    """A full-size fp16 SD 1.x file loaded for bf16 compute: converted tensor by tensor, mapped pages
    given back as they go, so the file is never resident next to its copy."""
    path = tmp_path / "sd1_fp16.safetensors"
    subprocess.run([sys.executable, ROOT / "tools" / "make_checkpoint.py", path, "--layout",
                    ROOT.parent / "shared" / "reference" / "layouts" / "sd1.json", "--dtype", "float16"],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    probe = ("import json, sys, time, ldm\n"
             "from ldm.inspect import peak_rss_mb\n"
             "import models.tokenizer, open_clip\n"  # imports count before the baseline
             "base = peak_rss_mb(); t = time.perf_counter()\n"
             "m = ldm.load(sys.argv[1], device='cpu', dtype='bfloat16')\n"
             "print(json.dumps({'base': base, 'peak': peak_rss_mb(), 'seconds': time.perf_counter() - t}))\n")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    size_mb = path.stat().st_size / 2 ** 20
    print(f"file {size_mb:.0f} MB, RSS before load {info['base']:.0f} MB, peak {info['peak']:.0f} MB, "
          f"load {info['seconds']:.1f} s")
    assert info["peak"] - info["base"] <= 1.3 * size_mb


def test_sd2_file_without_a_prediction_type_is_probed(tmp_path):
    """An SD 2 file whose config does not say eps or v (512-base and 768-v share a layout): one UNet
    call decides, and the note says what was chosen and how to override it."""
    from dataclasses import replace

    from models.config import from_yaml

    name = "sd2v_tiny"
    cfg = replace(from_yaml(FIXTURES[name] / f"{name}.yaml"), parameterization=None)
    model = ldm.load(FIXTURES[name] / f"{name}.safetensors", config=cfg, device="cpu")
    assert model.parameterization in ("eps", "v")
    note = next(n for n in model.notes if n.startswith("prediction type"))
    assert model.parameterization in note and "--prediction" in note
    assert ldm.load(FIXTURES[name] / f"{name}.safetensors", config=cfg, device="cpu",
                    prediction="v").parameterization == "v"


def test_an_integer_tensor_where_a_float_weight_belongs_is_named(tmp_path):
    """torch refuses to make an integer tensor a parameter with a message about gradients, deep inside
    load_state_dict; the loader names the key and its dtype instead."""
    sd = load_file(FIXTURES["sd1_tiny"] / "sd1_tiny.safetensors")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = sd[key].to(torch.int64)
    path = tmp_path / "sd1_tiny.safetensors"
    save_file(sd, str(path))
    copy_config(FIXTURES["sd1_tiny"] / "sd1_tiny.yaml", tmp_path)
    with pytest.raises(CheckpointError) as e:
        ldm.load(path, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "input_blocks.0.0.weight int64" in msg and "download it again" in msg
