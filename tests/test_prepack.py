"""models/prepack.py: prepacked CPU convolutions compute what F.conv2d computes and undo cleanly; oneDNN
linear layers compute what F.linear computes; neither loses a gradient. (What the user sees of them, the
plain weights: test_plain_weights.py.)"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldm
from conftest import FIXTURES, fixture_config, fixture_tensors, load_fixture_part
from ldm.pipeline import txt2img
from models.prepack import (OneDNNLinear, PackedConv2d, can_prepack, onednn_linears, plain_linears,
                            prepack_convolutions, unpack_convolutions)
from models.unet import UNetModel

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="this PyTorch has no oneDNN (mkldnn)")


def _conv(cin, cout, k=3, stride=1, padding=1, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding).eval().requires_grad_(False)
    return conv, conv.weight.detach().clone(), conv.bias.detach().clone()


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 2, 0)])
def test_conv_equals_plain_on_both_sides_of_the_rule(packed_calls, k, stride, padding):
    conv, w, b = _conv(64, 48, k, stride, padding)
    assert prepack_convolutions(conv) == 1 and type(conv) is PackedConv2d
    small, large = torch.randn(2, 64, 3, 5), torch.randn(1, 64, 40, 24)  # weight outweighs / is outweighed
    for x, packed in [(small, True), (large, False), (small, True), (small[:1], True)]:
        n = len(packed_calls)
        with torch.no_grad():
            out = conv(x)
        expected = F.conv2d(x, w, b, stride, padding)
        assert out.shape == expected.shape
        assert (out - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
        assert len(packed_calls) - n == packed
    assert conv._packed.shape == (1, 64, 3, 5)  # repacked for the new shape
    assert torch.equal(conv.weight, w) and not conv.weight.is_mkldnn


def test_unpack_restores_plain_conv2d_and_frees_the_copy():
    conv, w, b = _conv(32, 32)
    weight = conv.weight
    prepack_convolutions(conv)
    with torch.no_grad():
        conv(torch.randn(1, 32, 4, 4))
    assert conv._packed is not None and conv._packed.weight.is_mkldnn
    assert unpack_convolutions(conv) == 1
    assert type(conv) is nn.Conv2d and "_packed" not in vars(conv) and conv.weight is weight
    assert torch.equal(conv.weight, w) and torch.equal(conv.bias, b)
    assert type(conv.weight) is nn.Parameter and not conv.weight.requires_grad
    assert unpack_convolutions(conv) == 0


def test_a_onednn_without_the_kernels_falls_back_to_plain_convolution(monkeypatch):
    def missing(*args):
        raise RuntimeError("no such kernel in this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", missing)
    conv, w, b = _conv(64, 48)
    prepack_convolutions(conv)
    x = torch.randn(1, 64, 3, 3)
    with torch.no_grad():
        out = conv(x)
    assert torch.equal(out, F.conv2d(x, w, b, 1, 1))
    assert type(conv) is nn.Conv2d and torch.equal(conv.weight, w)
    with pytest.raises(RuntimeError):  # a genuinely wrong input still fails, as nn.Conv2d's own error
        prepack_convolutions(conv)
        conv(torch.randn(1, 5, 3, 3))


def test_gradients_flow_through_prepacked_convolutions_as_through_plain_ones(packed_calls):
    """oneDNN's packed convolution has no backward; an input that wants a gradient takes F.conv2d."""
    conv, w, b = _conv(64, 48)
    prepack_convolutions(conv)
    x = torch.randn(1, 64, 3, 3, requires_grad=True)  # small: the packed side of the rule
    conv(x).square().sum().backward()
    expected = torch.autograd.grad(F.conv2d(x, w, b, 1, 1).square().sum(), x)[0]
    assert x.grad is not None and (x.grad - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert packed_calls == []
    with torch.no_grad():
        conv(x)
    assert packed_calls == [(1, 64, 3, 3)]  # packed again once no gradient is wanted


def _linear(cin, cout, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(cin, cout, bias=bias).eval().requires_grad_(False)


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear_and_keeps_gradients(monkeypatch, bias):
    linear = _linear(96, 40, bias)
    w, b = linear.weight.clone(), None if linear.bias is None else linear.bias.clone()
    calls, real = [], torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    assert onednn_linears(linear) == 1 and type(linear) is OneDNNLinear
    x = torch.randn(2, 96, 7).transpose(1, 2)  # (2, 7, 96), strided as the UNet's flattened pixels
    with torch.no_grad():
        out = linear(x)
    expected = F.linear(x, w, b)
    assert calls == [x.shape] and (out - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    x.requires_grad_(True)
    linear(x).square().sum().backward()  # F.linear: oneDNN's op has no backward
    assert len(calls) == 1 and torch.allclose(x.grad, torch.autograd.grad(F.linear(x, w, b).square().sum(), x)[0])
    with torch.no_grad():
        half = linear.to(torch.float16)(x.detach().half())
    assert len(calls) == 1 and half.dtype == torch.float16  # oneDNN packs no float16 on the CPU: F.linear
    if can_prepack(torch.bfloat16):
        with torch.no_grad():
            brain = linear.to(torch.bfloat16)(x.detach().bfloat16())
        expected = F.linear(x.detach().bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()).float()
        assert len(calls) == 2 and brain.dtype == torch.bfloat16
        assert (brain.float() - expected).abs().max().item() <= 2 ** -7 * expected.abs().max().item()


def test_tuned_weights_and_strided_biases_take_f_linear(packed_calls):
    """A weight being tuned (LoRA-style) keeps its gradient, through linears and packed convolutions; a
    bias with odd strides (as a .ckpt can store it) is not handed to oneDNN, which would misread it."""
    linear, conv = _linear(16, 8), _conv(16, 16)[0]
    onednn_linears(linear), prepack_convolutions(conv)
    linear.weight.requires_grad_(True), conv.weight.requires_grad_(True)
    linear(torch.randn(3, 16)).sum().backward()
    conv(torch.randn(1, 16, 2, 2)).sum().backward()  # small: the packed side of the rule
    assert linear.weight.grad is not None and conv.weight.grad is not None
    assert packed_calls == []
    packed = _conv(16, 16, seed=2)[0]
    prepack_convolutions(packed)
    with torch.no_grad():
        packed(torch.randn(1, 16, 2, 2))
    assert packed_calls == [(1, 16, 2, 2)]
    packed.weight.requires_grad_(True)  # tuning starts after an inference call packed the weight
    packed(torch.randn(1, 16, 2, 2)).sum().backward()
    assert packed.weight.requires_grad and packed.weight.grad is not None and len(packed_calls) == 1
    strided = _linear(16, 8, seed=1)
    strided.bias = nn.Parameter(torch.randn(8, 2)[:, 0], requires_grad=False)
    onednn_linears(strided)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(strided(x), F.linear(x, strided.weight, strided.bias), atol=1e-5)


def test_compile_unet_hands_the_compiler_plain_layers():
    from ldm.generate import compile_unet

    unet = UNetModel(fixture_config("sd1_tiny").unet).eval().requires_grad_(False)
    prepack_convolutions(unet), onednn_linears(unet)
    compile_unet(unet, torch.device("cpu"))  # compiles lazily, on the first call: not called here
    assert not any(type(m) in (PackedConv2d, OneDNNLinear) for m in unet.modules())


def test_a_onednn_without_the_linear_kernel_falls_back_to_f_linear(monkeypatch):
    def missing(*args):
        raise RuntimeError("no such kernel in this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", missing)
    linear = _linear(16, 8)
    onednn_linears(linear)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    assert type(linear) is nn.Linear


def test_only_the_dtypes_onednn_packs():
    assert not can_prepack(torch.float16)
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    assert can_prepack(torch.bfloat16) == bool(bf16)


def test_unet_prepacked_matches_the_original_and_the_plain_path():
    name = "sd1_tiny"
    unet = UNetModel(fixture_config(name).unet).eval().requires_grad_(False)
    unet.load_state_dict(load_fixture_part(name, "model.diffusion_model."), strict=True)
    plain_state = {k: v.clone() for k, v in unet.state_dict().items()}
    f = fixture_tensors(name, "unet_forward")
    with torch.no_grad():
        plain = unet(f["x"], f["t"], f["context"])
        n = prepack_convolutions(unet)
        packed = unet(f["x"], f["t"], f["context"])
    kinds = [m._packed is not None for m in unet.modules() if isinstance(m, nn.Conv2d)]
    assert n == len(kinds) and any(kinds), "the tiny UNet should exercise the packed path"
    assert (packed - plain).abs().max().item() <= 1e-5
    assert (packed - f["out"]).abs().max().item() <= 1e-4  # the original implementation's output
    assert all(torch.equal(v, plain_state[k]) for k, v in unet.state_dict().items())
    assert unpack_convolutions(unet) == n


def test_load_on_cpu_prepacks_and_pipeline_output_is_unchanged():
    name = "sd1_tiny"
    path, yaml = FIXTURES[name] / f"{name}.safetensors", FIXTURES[name] / f"{name}.yaml"
    model = ldm.load(path, config=yaml, device="cpu")
    convs = [m for m in model.unet.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m) is PackedConv2d for m in convs)
    linears = [m for net in (model.unet, model.text_encoder) for m in net.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    images = [txt2img(model, "a bird", steps=4, seed=1, height=64, width=64)[0] for _ in range(2)]
    unpack_convolutions(model.unet), unpack_convolutions(model.vae)
    assert plain_linears(model.unet) + plain_linears(model.text_encoder) == len(linears)
    plain = txt2img(model, "a bird", steps=4, seed=1, height=64, width=64)[0]
    assert torch.equal(images[0], images[1])
    assert (images[0] - plain).abs().max().item() <= 1e-4


def _geglu(dim_in=96, dim_out=160, seed=0):
    from models.unet import GEGLU
    torch.manual_seed(seed)
    return GEGLU(dim_in, dim_out).eval().requires_grad_(False)


def _plain_geglu(x, proj):
    value, gate = F.linear(x.float(), proj.weight.float(), proj.bias.float()).chunk(2, dim=-1)
    return value * F.gelu(gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_geglu_computes_value_times_gelu_of_the_gate(dtype):
    """The two fused oneDNN matmuls compute GEGLU's value * gelu(gate) (the erf GELU, the first half of the
    projection the value): within float32 summation order in float32, within bf16 rounding of the output in
    bf16. The plain chunked path is the reference."""
    from models.prepack import fused_geglu
    if not can_prepack(dtype):
        pytest.skip(f"this CPU's oneDNN has no {dtype} kernels (needs AVX-512 BF16 or AMX)")
    geglu = _geglu().to(dtype)
    x = torch.randn(2, 37, 96).to(dtype)
    assert fused_geglu(x, geglu.proj) is None  # a plain nn.Linear: onednn_linears not applied
    onednn_linears(geglu)
    with torch.no_grad():
        fused = fused_geglu(x, geglu.proj)
        assert fused is not None and fused.dtype == dtype and fused.shape == (2, 37, 160)
        assert torch.equal(geglu(x), fused)  # the module takes the fused path
        expected = _plain_geglu(x, geglu.proj)
    err = (fused.float() - expected).abs().max().item()
    assert err <= (1e-5 if dtype == torch.float32 else 2 ** -7) * expected.abs().max().item()
    # bf16: closer to the float32 math than the plain bf16 path (the GELU is not rounded before the product)
    if dtype == torch.bfloat16:
        plain_linears(geglu)
        with torch.no_grad():
            plain = geglu(x).float()
        assert (fused.float() - expected).pow(2).mean() <= (plain - expected).pow(2).mean()


def test_fused_geglu_steps_aside_for_gradients_and_when_switched_off():
    from models.prepack import fused_geglu
    geglu = _geglu()
    onednn_linears(geglu)
    x = torch.randn(3, 96)
    geglu.requires_grad_(True)
    assert fused_geglu(x, geglu.proj) is None  # a weight being tuned: autograd's path
    out = geglu(x)
    out.sum().backward()
    assert geglu.proj.weight.grad is not None
    geglu.requires_grad_(False)
    assert fused_geglu(x, geglu.proj) is not None
    plain_linears(geglu)
    assert fused_geglu(x, geglu.proj) is None
