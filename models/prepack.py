"""CPU convolutions on weights reordered once, instead of once per call; float32 linear layers on oneDNN.

oneDNN computes a convolution in a blocked weight layout; `F.conv2d` reorders the plain (O, I, kh, kw)
weight into it on every call. Where the weight outweighs the activations (the UNet's 1280-channel
convolutions on 8x8 to 16x16 latents) that reorder costs more than the convolution: a 1280->1280 3x3
conv on a 2x1280x8x8 input takes 70 ms plain and 28 ms on a weight reordered beforehand (2-core AVX2
EPYC, float32; at 4x4, 46 ms against 9 ms). Where the activations outweigh the weight (the VAE, the
UNet's 64x64 level) the prepacked call is no faster and sometimes slower (320->4 on 64x64: 1.6x slower),
so each convolution decides per input shape: prepacked when weight.numel() >= input.numel().

The packed weight replaces the plain one (memory stays one copy) and is repacked when the input shape
changes, as oneDNN picks the blocked layout for a shape. `unpack_convolutions` restores plain weights,
for a state_dict or a move to another device. Same numbers as F.conv2d up to float32 summation order.
The packed op has no backward: where an input or a weight wants a gradient, F.conv2d runs instead.

Float32 linear layers go to oneDNN's matmul instead of F.linear's MKL one: on the 2-core AVX2 EPYC the
UNet's 64x64-level projections ran 1.6-1.8x faster there (8192x1280 @ 1280x320: 52 ms against 94 ms), a
256x256 CFG step 3.44 s against 3.81 s. bfloat16 F.linear already uses oneDNN. The weights stay plain, so
only torch.compile needs them undone (`plain_linears`). No backward either: F.linear runs where a gradient
is wanted.
"""
from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn


def can_prepack(dtype: torch.dtype) -> bool:
    """float32 wherever oneDNN is built in; bfloat16 only where oneDNN has bf16 kernels (AVX-512 BF16,
    AMX): elsewhere its reorder refuses bf16."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check is not None and check())
    return dtype == torch.float32


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _plain(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_dense() if weight.is_mkldnn else weight


def _wants_grad(x: torch.Tensor, layer: nn.Module) -> bool:
    """oneDNN's pointwise ops have no autograd: through them a gradient would silently be lost, for the
    input or for a weight being tuned."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))


def _forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    shape = tuple(x.shape)
    if x.device.type != "cpu" or conv.weight.numel() < x.numel() or _wants_grad(x, conv):
        if conv.weight.is_mkldnn:  # an earlier, smaller input had it packed
            plain = nn.Parameter(_plain(conv.weight), requires_grad=conv.weight.requires_grad)
            conv.weight, conv.packed_for = plain, None
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    padding, stride, dilation, groups = _conv_args(conv)
    try:
        if conv.packed_for != shape:
            packed = torch.ops.mkldnn._reorder_convolution_weight(_plain(conv.weight), padding, stride, dilation,
                                                                  groups, list(shape))
            conv.weight, conv.packed_for = nn.Parameter(packed, requires_grad=False), shape
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, padding, stride, dilation,
                                                       groups, "none", [], "")
    except RuntimeError:
        # A oneDNN build without these kernels (only x86 Linux was tried): F.conv2d from now on, which
        # also raises the error again if the input itself was wrong.
        unpack_convolutions(conv)
        return conv(x)


def _convolutions(module: nn.Module) -> list:
    return [m for m in module.modules() if type(m) is nn.Conv2d and m.padding_mode == "zeros"]


def prepack_convolutions(module: nn.Module) -> int:
    """Make every zero-padded nn.Conv2d in `module` (inference only) reorder its weight on the first call
    of each input shape rather than on every call. Returns how many convolutions were switched."""
    convs = _convolutions(module)
    for conv in convs:
        conv.packed_for = None
        conv.forward = MethodType(_forward, conv)
    return len(convs)


def unpack_convolutions(module: nn.Module) -> int:
    """Undo `prepack_convolutions`: plain weights and nn.Conv2d's own forward again."""
    convs = [m for m in _convolutions(module) if "forward" in vars(m)]
    for conv in convs:
        conv.weight = nn.Parameter(_plain(conv.weight), requires_grad=False)
        del conv.forward, conv.packed_for
    return len(convs)


_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # PyTorch >= 2.3


def _linear_forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = linear.bias
    if (x.device.type == "cpu" and x.dtype == linear.weight.dtype == torch.float32 and not _wants_grad(x, linear)
            and (bias is None or bias.is_contiguous())  # the op reads the bias as if it were
            and not _compiling()):  # the compiler picks its own kernels (plain_linears undoes it all)
        try:
            return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "none", [], "")
        except RuntimeError:  # a oneDNN build without the kernel: F.linear from now on
            del linear.forward
    return F.linear(x, linear.weight, linear.bias)


def onednn_linears(module: nn.Module) -> int:
    """Make every nn.Linear in `module` compute float32 CPU inputs with oneDNN's matmul (other devices and
    dtypes, and calls that need a gradient, go to F.linear as before). Returns how many were switched."""
    linears = [m for m in module.modules() if type(m) is nn.Linear]
    for linear in linears:
        linear.forward = MethodType(_linear_forward, linear)
    return len(linears)


def plain_linears(module: nn.Module) -> int:
    """Undo `onednn_linears`: nn.Linear's own forward again (before torch.compile, or to compare)."""
    linears = [m for m in module.modules() if type(m) is nn.Linear and "forward" in vars(m)]
    for linear in linears:
        del linear.forward
    return len(linears)
