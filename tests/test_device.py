"""The device/dtype policy: decided once in ldm/device.py, never hard-coded elsewhere."""
import re
from pathlib import Path

import pytest
import torch

import ldm
from conftest import FIXTURES
from ldm.device import DeviceError, cpu_has_bf16, resolve
from models.layers import GroupNorm32, attention

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_defaults_to_float32_and_autocast_is_a_no_op_there():
    assert resolve("cpu") .dtype == torch.float32
    assert resolve("cpu", precision="autocast").dtype == torch.float32
    assert resolve("cpu", precision="full").dtype == torch.float32
    assert resolve("cpu", dtype="bfloat16").dtype == torch.bfloat16


def test_float16_on_a_cpu_becomes_bf16_or_fp32_with_a_note():
    p = resolve("cpu", dtype="float16")
    assert p.dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert len(p.notes) == 1 and "float16" in p.notes[0] and "\n" not in p.notes[0]


def test_unusable_requests_are_one_line_errors():
    with pytest.raises(DeviceError, match="int8"):
        resolve("cpu", dtype="int8")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cpu"):
            resolve("cuda")


def test_half_checkpoint_on_cpu_runs_instead_of_slow_conv2d_error():
    """The SD 2.x configs say use_fp16: True; the original casts to half and dies on a CPU."""
    name = "sd2_tiny"
    model = ldm.load(FIXTURES[name] / f"{name}.safetensors", config=FIXTURES[name] / f"{name}.yaml",
                     device="cpu", dtype="float16")
    assert next(model.unet.parameters()).dtype != torch.float16
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = model.unet(x, torch.tensor([10]), torch.randn(1, 77, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def _record_dtypes(monkeypatch, module, name):
    seen, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_half_attention_on_the_cpu_keeps_float32_logits():
    """The CPU kernel accumulates half in float32 by itself: logits far past fp16's 65504 stay finite
    and the answer agrees with float32 (a kernel with fp16 logits would give inf/NaN here)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 16, 64, generator=g) * 40, torch.randn(1, 16, 64, generator=g) * 40
    v = torch.randn(1, 16, 64, generator=g)
    half = attention(q.half(), k.half(), v.half(), heads=1)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert (half.float() - attention(q, k, v, heads=1)).abs().max() < 2e-2


def test_half_math_is_cast_to_float32_where_kernels_do_not(monkeypatch):
    """On devices whose kernels may keep fp16 sums (MPS; here the meta device stands in), attention
    and group norm get float32 inputs; on CPU and CUDA the kernels' own fp32 accumulation is used."""
    import models.layers as layers
    monkeypatch.setattr(layers, "HALF_SUMS_IN_HALF", ("mps", "meta"))
    seen_attn = _record_dtypes(monkeypatch, layers.F, "scaled_dot_product_attention")
    seen_norm = _record_dtypes(monkeypatch, layers.F, "group_norm")
    q = torch.empty(1, 16, 64, dtype=torch.float16, device="meta")
    assert attention(q, q, q, heads=2).dtype == torch.float16
    norm = GroupNorm32(32, 32).half().to("meta")
    assert norm(torch.empty(1, 32, 8, 8, dtype=torch.float16, device="meta")).dtype == torch.float16
    assert seen_attn == [torch.float32] and seen_norm == [torch.float32]
    cpu = torch.randn(1, 16, 64).half()
    attention(cpu, cpu, cpu, heads=2)
    assert seen_attn[-1] == torch.float16
    attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), heads=2)
    assert seen_attn[-1] == torch.bfloat16  # bf16 has fp32's range: never cast


def test_group_norm_on_the_cpu_in_half_matches_float32():
    x = torch.randn(1, 32, 64, 64) * 300 + 1000  # fp16 sums of squares would overflow
    out = GroupNorm32(32, 32).half()(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - GroupNorm32(32, 32)(x)).abs().max() < 1e-2


def test_no_hard_coded_cuda_in_library_code():
    pattern = re.compile(r'\.cuda\(|"cuda"|\'cuda\'')
    offenders = [f"{p.relative_to(ROOT)}:{i}" for pkg in ("models", "samplers", "weights")
                 for p in (ROOT / pkg).rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


@pytest.mark.parametrize("name", ["sd1_tiny", "sd2v_tiny"])
def test_bfloat16_images_stay_within_30_db_of_float32(name):
    """bf16 weights and activations (latents and sampler math stay float32): the whole txt2img's image
    against float32's. Measured 38-40 dB at 64x64/10 steps on the three tiny fixtures."""
    import numpy as np

    from ldm.images import to_uint8
    from ldm.pipeline import txt2img

    images = []
    for dtype in ("float32", "bfloat16"):
        model = ldm.load(FIXTURES[name] / f"{name}.safetensors", config=FIXTURES[name] / f"{name}.yaml",
                         device="cpu", dtype=dtype)
        image = txt2img(model, "a photograph of an astronaut riding a horse", seed=42, height=48, width=48,
                        steps=6, sampler="ddim")[0]
        images.append(to_uint8(image).astype(float))
    psnr = 10 * np.log10(255 ** 2 / ((images[0] - images[1]) ** 2).mean())
    assert psnr >= 30, f"{psnr:.1f} dB"


def test_torch_devices_and_dtypes_are_taken_as_well_as_names():
    assert resolve(torch.device("cpu"), torch.float32) == resolve("cpu", "float32")
    assert resolve(torch.device("cpu"), torch.bfloat16).dtype == torch.bfloat16
    assert resolve("cpu", torch.float16) == resolve("cpu", "fp16")  # the CPU's half fallback, with its note
    with pytest.raises(DeviceError, match="torch.int8"):
        resolve("cpu", torch.int8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_takes_torch_objects(dtype):
    name = "sd1_tiny"
    model = ldm.load(FIXTURES[name] / f"{name}.safetensors", device=torch.device("cpu"), dtype=dtype)
    assert model.placement.device == torch.device("cpu") and model.placement.dtype == dtype
    assert {p.dtype for p in model.unet.parameters()} == {dtype}
