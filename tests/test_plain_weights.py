"""The CPU speed-ups (models/prepack.py) never show: after ldm.load and forward calls that took the packed
path, the networks are what the file holds, and .to(), load_state_dict, in-place edits, deepcopy,
torch.compile and training behave as on plain PyTorch layers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import ldm
from conftest import FIXTURES
from models.prepack import can_prepack, plain_linears, unpack_convolutions

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="this PyTorch has no oneDNN (mkldnn)")

NAME = "sd1_tiny"
PATH, YAML = FIXTURES[NAME] / f"{NAME}.safetensors", FIXTURES[NAME] / f"{NAME}.yaml"
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
# Latent sizes where, in the tiny networks, some convolutions' weights outweigh their inputs (packed) and
# some do not (plain): both sides of the rule run.
SIZES = (8, 16)


@pytest.fixture
def model():
    model = ldm.load(PATH, config=YAML, device="cpu")
    assert model.placement.dtype == torch.float32
    return model


def _file(net: str) -> dict:
    prefix = PREFIXES[net]
    return {k[len(prefix):]: v for k, v in load_file(PATH).items() if k.startswith(prefix)}


def _inputs(size: int, context_dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, size, size, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 77, context_dim, generator=g))


def _assert_plain_and_the_files(net: nn.Module, file: dict) -> None:
    state = net.state_dict()
    assert sorted(state) == sorted(file)
    for k, v in state.items():
        assert v.layout == torch.strided and not v.is_mkldnn, k
        assert v.dtype == file[k].dtype and torch.equal(v, file[k]), k
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    # a Parameter (a packed conv's is a WatchedWeight, which only adds a version bump to `.data`), strided
    assert convs and all(isinstance(m.weight, nn.Parameter) and m.weight.layout == torch.strided for m in convs)
    assert all(type(v) is torch.Tensor for v in state.values())


def test_state_dict_after_packed_calls_is_the_files_tensors(model, packed_calls):
    for size in SIZES * 2:
        x, t, context = _inputs(size)
        with torch.no_grad():
            n = len(packed_calls)
            model.unet(x, t, context)
            unet_packed = len(packed_calls) - n
            model.vae.decode(x[:1])
            vae_packed = len(packed_calls) - n - unet_packed
        assert unet_packed > 0 and vae_packed > 0, "the packed path must run, or this test proves nothing"
    for net in ("unet", "vae"):
        _assert_plain_and_the_files(getattr(model, net), _file(net))


class _Recorder:
    """A forward hook keeping one convolution's last input and output."""

    def __init__(self, conv: nn.Conv2d):
        self.conv, self.handle = conv, conv.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.x, self.out = args[0], out

    def conv2d(self, weight: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(self.x, weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


def _step(model, rec: _Recorder, weight_now: torch.Tensor, weight_before: torch.Tensor) -> None:
    """One UNet call: the recorded conv took the packed path and computed with `weight_now`, which gives
    a result clearly apart from `weight_before`'s (so a stale packed copy could not pass)."""
    with torch.no_grad():
        model.unet(*_inputs(8))
    assert rec.conv._packed is not None and rec.conv._packed.shape == tuple(rec.x.shape)
    tol = 1e-5 * rec.out.abs().max().item()
    assert (rec.out - rec.conv2d(weight_now)).abs().max().item() <= tol
    assert (rec.conv2d(weight_before) - rec.conv2d(weight_now)).abs().max().item() > 100 * tol


def test_to_another_dtype_and_load_state_dict_take_effect_on_the_next_call(model):
    conv = model.unet.middle_block[0].in_layers[2]  # 64 channels on a 2x2 latent: packed
    rec, original = _Recorder(conv), conv.weight.detach().clone()
    _step(model, rec, original, torch.zeros_like(original))
    model.unet.to(torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 and v.layout == torch.strided
               for v in model.unet.state_dict().values() if v.is_floating_point())
    model.unet.to(torch.float32)
    rounded = conv.weight.detach().clone()
    _step(model, rec, rounded, original)
    model.unet.load_state_dict(_file("unet"), strict=True)
    _step(model, rec, original, rounded)
    _assert_plain_and_the_files(model.unet, _file("unet"))


def test_an_in_place_edit_of_a_packed_weight_changes_the_next_output(model):
    conv = model.unet.output_blocks[0][0].in_layers[2]
    rec, original = _Recorder(conv), conv.weight.detach().clone()
    _step(model, rec, original, torch.zeros_like(original))
    with torch.no_grad():
        conv.weight.add_(0.05 * torch.randn_like(conv.weight))  # a LoRA merge
    _step(model, rec, conv.weight.detach(), original)
    with torch.no_grad():
        conv.weight.copy_(original)  # and unmerged: the same memory, the old values
    _step(model, rec, original, original + 1)


def test_a_merge_through_data_changes_the_next_output(model):
    """peft merges and unmerges LoRA through `.data` (`weight.data += delta`), which autograd's version counter
    never sees: the packed copy must be remade all the same."""
    conv = model.unet.output_blocks[0][0].in_layers[2]
    rec, original = _Recorder(conv), conv.weight.detach().clone()
    _step(model, rec, original, torch.zeros_like(original))
    delta = 0.05 * torch.randn(original.shape, generator=torch.Generator().manual_seed(3))
    conv.weight.data += delta  # peft's merge
    _step(model, rec, original + delta, original)
    conv.weight.data.sub_(delta)  # its unmerge
    _step(model, rec, original, original + delta)
    conv.weight.data = original + 2 * delta  # its safe_merge
    _step(model, rec, original + 2 * delta, original)


def _lora_on(conv: nn.Conv2d, rank: int = 2, seed: int = 0):
    """A rank-`rank` delta added to a 3x3 conv's output through a forward hook, as LoRA adapters add one."""
    g = torch.Generator().manual_seed(seed)
    down = (0.1 * torch.randn(rank, conv.in_channels, generator=g)).requires_grad_()
    up = (0.1 * torch.randn(conv.out_channels, rank, generator=g)).requires_grad_()
    conv.register_forward_hook(lambda m, args, out: out + torch.einsum("or,ri,bihw->bohw", up, down, args[0]))
    return [down, up]


def _train(unet: nn.Module, params: list, steps: int = 2) -> tuple:
    x, t, context = _inputs(8)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    opt, losses, grads = torch.optim.SGD(params, lr=0.5), [], []
    for _ in range(steps + 1):
        opt.zero_grad()
        loss = F.mse_loss(unet(x, t, context), target)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in params])
        opt.step()
    return losses, grads


def test_a_lora_style_parameter_trains_on_the_loaded_unet(model, packed_calls):
    with torch.no_grad():
        model.unet(*_inputs(8))  # inference first: the packed copies exist when tuning starts
    assert packed_calls
    plain = copy.deepcopy(model.unet)  # the reference: the same weights on plain PyTorch layers
    assert unpack_convolutions(plain) > 0 and plain_linears(plain) > 0
    block = "input_blocks.1.0.in_layers.2"  # early: most packed convolutions lie downstream of it
    losses, grads = _train(model.unet, _lora_on(model.unet.get_submodule(block)))
    expected_losses, expected_grads = _train(plain, _lora_on(plain.get_submodule(block)))
    assert losses[2] < losses[1] < losses[0]
    assert all(g.abs().max() > 0 for step in grads for g in step)
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    for got, expected in zip(grads, expected_grads):
        assert all((g - e).abs().max() <= 1e-5 * e.abs().max() for g, e in zip(got, expected))  # summation order


def test_requires_grad_gives_the_convolutions_their_gradients(model):
    with torch.no_grad():
        model.unet(*_inputs(8))
    plain = copy.deepcopy(model.unet)
    unpack_convolutions(plain), plain_linears(plain)
    for net in (model.unet, plain):
        net.requires_grad_(True)
        net(*_inputs(8)).square().mean().backward()
    convs = [(n, m) for n, m in model.unet.named_modules() if isinstance(m, nn.Conv2d)]
    for name, conv in convs:
        expected = plain.get_submodule(name).weight.grad
        assert conv.weight.grad is not None and torch.allclose(conv.weight.grad, expected, rtol=1e-4,
                                                               atol=1e-5 * expected.abs().max().item()), name


def test_deepcopy_and_compile_after_packed_calls(model, packed_calls):
    x, t, context = _inputs(8)
    with torch.no_grad():
        out = model.unet(x, t, context)
        assert packed_calls
        twin = copy.deepcopy(model.unet)
        assert torch.equal(twin(x, t, context), out)
        compiled = torch.compile(model.unet, backend="eager")  # the graph the compiler sees, without undoing
        assert (compiled(x, t, context) - out).abs().max().item() <= 1e-5
    _assert_plain_and_the_files(twin, _file("unet"))
