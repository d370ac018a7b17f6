"""CPU convolutions on weights reordered once, instead of once per call; float32 linear layers on oneDNN.

oneDNN computes a convolution in a blocked weight layout; `F.conv2d` reorders the plain (O, I, kh, kw)
weight into it on every call. Where the weight outweighs the activations (the UNet's 1280-channel
convolutions on 8x8 to 16x16 latents) that reorder costs more than the convolution itself; where the
activations outweigh the weight (the VAE, the UNet's 64x64 level) a prepacked call is no faster and
sometimes slower. So each convolution decides per input shape: prepacked when weight.numel() >= input.numel().
(Measured numbers: the README's "Memory and speed".)

What a user sees stays the plain network: `conv.weight` is the plain Parameter and the only truth, so
`state_dict()`, `load_state_dict`, `.to()`, `requires_grad_`, hooks and autograd behave as for nn.Conv2d.
The reordered copy is a private cache of `PackedConv2d` (not a parameter or buffer), made on the first
call of an input shape and remade whenever the weight it came from is no longer the one in `conv.weight`
(another tensor, another dtype or device, or an in-place edit such as a LoRA merge: `_version`). Writes
through `.data` bypass autograd's version counter, and peft's LoRA merge writes that way
(`weight.data += delta`), so a packed convolution's weight is a `WatchedWeight`: an nn.Parameter whose `.data`,
handed out or set, counts as an edit. Only a write through memory torch does not see (a numpy view of the
weight) goes unnoticed. The price is memory: a packed convolution holds its weight twice. A copy that
replaced the Parameter (one copy) made every one of those operations fail until one knew to undo it.

The packed op has no backward and the compiler cannot trace it: where an input or a weight wants a
gradient, under torch.compile, or off the CPU, nn.Conv2d's own forward runs. Same numbers as F.conv2d
up to float32 summation order.

Linear layers go to oneDNN's matmul op instead of F.linear: in float32 F.linear takes MKL's, which is slower
on the UNet's 64x64-level projections; in bfloat16 F.linear reaches oneDNN too, but through addmm's path,
which ran the UNet's projections 1.1-1.7x slower on an AMX Xeon than the op called directly. The weights stay
plain there (the op takes them as they are), so nothing is cached.

Both switch a module's class (`conv.__class__ = PackedConv2d`) rather than its instance's `forward`: the
layer says what it is in `repr`, deepcopy and pickle work, and undoing it is switching the class back.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # PyTorch >= 2.3


@lru_cache(maxsize=None)
def can_prepack(dtype: torch.dtype) -> bool:
    """float32 wherever oneDNN is built in; bfloat16 only where oneDNN has bf16 kernels (AVX-512 BF16,
    AMX): elsewhere its reorder refuses bf16."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check is not None and check())
    return dtype == torch.float32


def _wants_grad(x: torch.Tensor, layer: nn.Module) -> bool:
    """oneDNN's pointwise ops have no autograd: through them a gradient would silently be lost, for the
    input or for a weight being tuned."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))


_increment_version = getattr(torch.autograd.graph, "increment_version", None) or torch._C._increment_version
_TENSOR_DATA = torch._C.TensorBase.data  # the `.data` property every tensor has


class WatchedWeight(nn.Parameter):
    """The weight of a PackedConv2d: an nn.Parameter in every way but one. Handing out `.data` (or setting it)
    bumps the version counter, as an in-place op on the Parameter would, because what is done to that tensor
    (`weight.data += delta`, peft's LoRA merge) changes these values without autograd seeing it. A read
    through `.data` costs the next packed call one reorder; nothing else changes."""

    @property
    def data(self) -> torch.Tensor:
        _increment_version(self)
        return _TENSOR_DATA.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        _TENSOR_DATA.__set__(self, value)
        _increment_version(self)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + repr(self.detach())


def _watch(weight: torch.Tensor) -> None:
    """Make a conv's Parameter a WatchedWeight in place (the same object: optimizers and hooks keep it)."""
    if type(weight) is nn.Parameter:
        weight.__class__ = WatchedWeight


def _weight_key(weight: torch.Tensor) -> tuple:
    """What identifies the values a packed copy was made from. `_version` counts in-place edits; the
    address, with the source kept alive by the cache (so no new tensor can take it), tells tensors apart."""
    return weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape, weight.stride()


@dataclass(frozen=True)
class _Packed:
    shape: tuple  # the input shape oneDNN chose the blocked layout for
    key: tuple  # _weight_key of the source
    source: torch.Tensor  # the plain weight it was made from (a view of its memory, no copy)
    weight: torch.Tensor  # the oneDNN blocked copy


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d whose CPU inference calls reuse a oneDNN-reordered copy of the weight (see the module
    docstring). Made by `prepack_convolutions`; everything else is nn.Conv2d's."""

    _packed: Optional[_Packed] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (_compiling() or x.device.type != "cpu" or x.dtype != w.dtype or w.layout != torch.strided
                or w.numel() < x.numel() or not can_prepack(x.dtype) or _wants_grad(x, self)):
            return self._conv_forward(x, w, self.bias)
        padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
        try:
            packed, shape = self._packed, tuple(x.shape)
            if packed is None or packed.shape != shape or packed.key != _weight_key(w):
                self._packed = None  # the stale copy goes before the new one is made
                _watch(w)  # also a Parameter assigned since
                blocked = torch.ops.mkldnn._reorder_convolution_weight(w.detach(), padding, stride, dilation,
                                                                       self.groups, list(shape))
                packed = self._packed = _Packed(shape, _weight_key(w), w.detach(), blocked)
            return torch.ops.mkldnn._convolution_pointwise(x, packed.weight, self.bias, padding, stride, dilation,
                                                           self.groups, "none", [], "")
        except RuntimeError:
            # A oneDNN build without these kernels (only x86 Linux was tried): F.conv2d from now on, which
            # also raises the error again if the input itself was wrong.
            unpack_convolutions(self)
            return self._conv_forward(x, w, self.bias)

    def _apply(self, *args, **kwargs):
        self._packed = None  # .to(), .float(), .cpu(), ...: the weight is replaced, the copy would only hold memory
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        # deepcopy and pickle: a oneDNN tensor has no storage to copy, and the copy's weight is another anyway
        return {k: v for k, v in super().__getstate__().items() if k != "_packed"}


def _convolutions(module: nn.Module) -> list:
    return [m for m in module.modules() if type(m) is nn.Conv2d and m.padding_mode == "zeros"]


def prepack_convolutions(module: nn.Module) -> int:
    """Make every zero-padded nn.Conv2d in `module` a PackedConv2d: on the CPU in inference it reorders its
    weight on the first call of each input shape rather than on every call. Returns how many were switched."""
    convs = _convolutions(module)
    for conv in convs:
        conv.__class__ = PackedConv2d
        _watch(conv.weight)
    return len(convs)


def unpack_convolutions(module: nn.Module) -> int:
    """Undo `prepack_convolutions`: plain nn.Conv2d again, the cached copies freed (the weights never
    changed). Not needed for state_dict, .to() or training; only to compare or to save the memory."""
    convs = [m for m in module.modules() if type(m) is PackedConv2d]
    for conv in convs:
        conv.__class__ = nn.Conv2d
        vars(conv).pop("_packed", None)
        if type(conv.weight) is WatchedWeight:
            conv.weight.__class__ = nn.Parameter
    return len(convs)


class OneDNNLinear(nn.Linear):
    """nn.Linear whose float32 and bfloat16 CPU inference calls run on oneDNN's matmul, on the plain weight
    (bfloat16 where oneDNN has its kernels). Made by `onednn_linears`; everything else is nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype and can_prepack(x.dtype)
                and not _wants_grad(x, self)
                and (bias is None or bias.is_contiguous())  # the op reads the bias as if it were
                and not _compiling()):  # the compiler picks its own kernels
            try:
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")
            except RuntimeError:  # a oneDNN build without the kernel: F.linear from now on
                self.__class__ = nn.Linear
        return F.linear(x, self.weight, bias)


def onednn_linears(module: nn.Module) -> int:
    """Make every nn.Linear in `module` a OneDNNLinear: float32 and bfloat16 CPU inputs go to oneDNN's matmul (other
    devices and dtypes, and calls that need a gradient, to F.linear as before). Returns how many."""
    linears = [m for m in module.modules() if type(m) is nn.Linear]
    for linear in linears:
        linear.__class__ = OneDNNLinear
    return len(linears)


def plain_linears(module: nn.Module) -> int:
    """Undo `onednn_linears`: plain nn.Linear again (to compare; torch.compile needs it no more)."""
    linears = [m for m in module.modules() if type(m) is OneDNNLinear]
    for linear in linears:
        linear.__class__ = nn.Linear
    return len(linears)


def fused_geglu(x: torch.Tensor, proj: nn.Linear) -> Optional[torch.Tensor]:
    """GEGLU's `value * gelu(gate)` from one projection `proj` whose output's first half is the value and
    second half the gate, as two oneDNN matmuls with the GELU and the product fused into them: the
    (tokens, 2 * inner) projection, its chunks and two elementwise passes over them are never written
    (a 2x4096x320 -> 2x1280 bf16 GEGLU on 1 thread of an AMX Xeon: 58 ms plain, 13.5 ms fused). The halves
    are views of the plain weight, so nothing is cached. GELU is the exact (erf) one, computed in float32
    before the product is rounded. None where the plain path must run (not the CPU, a dtype oneDNN does
    not pack, gradients, the compiler, a oneDNN build without the ops, and a `proj` that `onednn_linears`
    did not switch: `plain_linears` turns this off with the rest)."""
    w, b = proj.weight, proj.bias
    if (type(proj) is not OneDNNLinear or x.device.type != "cpu" or x.dtype != w.dtype or not can_prepack(x.dtype)
            or _compiling() or _wants_grad(x, proj) or b is None or not w.is_contiguous() or not b.is_contiguous()):
        return None
    n = w.shape[0] // 2
    try:
        gate = torch.ops.mkldnn._linear_pointwise(x, w[n:], b[n:], "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, w[:n], b[:n], "mul")
    except RuntimeError:  # a oneDNN build without the fused kernels: the plain path
        return None
