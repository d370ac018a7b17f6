"""What a checkpoint's pickle may name: torch's and numpy's plain-value globals, and the training-time
classes (Lightning, OmegaConf, argparse) that are replaced by inert stubs instead of being imported."""
from __future__ import annotations

from typing import Any

import torch

from weights.numpy_values import numpy_globals


# Training-only objects a Lightning checkpoint carries next to the weights (ModelCheckpoint
# callback state, hyper-parameter namespaces). Inference never reads them, so each becomes a stub.
INERT_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")
INERT_NAMES = frozenset({"argparse.Namespace"})

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save(_use_new_zipfile_serialization=False)
_LEGACY_PROTOCOL = 1001


def _torch_names() -> frozenset[str]:
    """Globals torch's weights-only unpickler accepts by default and a state dict can need."""
    names = {
        "collections.OrderedDict",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch._tensor._rebuild_from_type_v2",
        "_codecs.encode",  # protocol 2 spells bytes as _codecs.encode(str, "latin1")
        "builtins.set",
        "builtins.bytearray",
        "builtins.complex",
    }
    for fn in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
               "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_cpu_tensor"):
        names.add(f"torch._utils.{fn}")
    for attr, obj in list(vars(torch).items()):  # vars, not dir: no lazy submodule imports
        if isinstance(obj, torch.dtype):
            names.add(f"torch.{attr}")
        elif attr.endswith("Storage") and isinstance(obj, type):
            names.add(f"torch.{attr}")
            names.add(f"{obj.__module__}.{obj.__qualname__}")
    return frozenset(names)


TORCH_GLOBALS = _torch_names()
NUMPY_GLOBALS = numpy_globals()  # stand-ins that rebuild numpy values from plain ones

# The element type of each storage class a checkpoint may name (quantized storages are not among them).
_PLAIN_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                 torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex128, torch.complex64)
_STORAGE_DTYPES = {f"torch.{name}": dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()
                   if dtype in _PLAIN_DTYPES}
_UNTYPED = ("torch.UntypedStorage", "torch.storage.UntypedStorage")
_DTYPES = {f"torch.{attr}": obj for attr, obj in vars(torch).items() if isinstance(obj, torch.dtype)}
_TENSOR_CLASSES = ("torch.Tensor", "torch.nn.parameter.Parameter")
# Calls that would build an object from a size alone; torch.save never writes them.
_NEVER_CALLED = frozenset({"torch.Tensor", "numpy.ndarray", *_DTYPES,
                           *(n for n in TORCH_GLOBALS if n.endswith("Storage"))})
_MAX_DIMS = 64


def is_inert(name: str) -> bool:
    return name.startswith(INERT_PREFIXES) or name in INERT_NAMES


class InertStub:
    """Stand-in for a training-only class: accepts any arguments and state, keeps nothing."""

    def __new__(cls, *args: Any, **kwargs: Any):
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<stub for {type(self).__module__}.{type(self).__qualname__}>"


_stubs: dict[str, type] = {}


def stub_for(name: str) -> type:
    """One stub class per foreign name, carrying that name so it reads well in a repr."""
    if name not in _stubs:
        module, _, qualname = name.rpartition(".")
        _stubs[name] = type(qualname, (InertStub,), {"__module__": module, "__qualname__": qualname})
    return _stubs[name]
