"""Reading `.ckpt`/`.pt`/`.pth` pickles without running anything the file asks for.

A pickle is a program: every global it names is something the unpickler imports and may call.
Official SD checkpoints only need tensors, storages, `OrderedDict`, a few numpy scalars and the
Lightning callback objects the training run saved beside the weights. Two gates stand between the
file and the interpreter:

1. `scan_globals` unpickles the file once with every global replaced by an inert placeholder, so it
   can name each global the file uses and refuse the first one outside the allow-list before
   anything real is built;
2. the load itself is `torch.load(weights_only=True)` (torch's own restricted unpickler), with
   do-nothing stand-ins for training-only classes and the numpy stand-ins of weights/numpy_values.py
   (numpy values rebuilt from plain ones, never by numpy's own unpickling) registered for the duration.
"""
from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import zipfile
from typing import Any, Iterator

import torch

from weights.errors import CheckpointError
from weights.numpy_values import numpy_globals

# Training-only objects a Lightning checkpoint carries next to the weights (ModelCheckpoint
# callback state, hyper-parameter namespaces). Inference never reads them, so each becomes a stub.
INERT_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")
INERT_NAMES = frozenset({"argparse.Namespace"})

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save(_use_new_zipfile_serialization=False)


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


class _Refused(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _Placeholder:
    """What every global becomes during the scan: callable, buildable, fillable, inert."""

    def __new__(cls, *args: Any, **kwargs: Any):
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(*args: Any) -> None:  # no `self`: BUILD may target the class itself
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _ScanUnpickler(pickle.Unpickler):
    """Collects the globals a pickle names; never imports or calls any of them."""

    def __init__(self, file: Any):
        super().__init__(file)
        self.names: set[str] = set()

    def find_class(self, module: str, name: str) -> type:
        # Protocol 2 files spell Python 3 names the Python 2 way (`__builtin__.eval`); map them back
        # as torch's unpickler does, so both gates judge the same name.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if not (full in TORCH_GLOBALS or full in NUMPY_GLOBALS or is_inert(full)):
            raise _Refused(full)
        self.names.add(full)
        return _Placeholder

    def persistent_load(self, pid: Any) -> None:
        return None


def _scan_stream(f: Any, path: str, count: int) -> tuple[set[str], list[Any]]:
    """Scan up to `count` consecutive pickles in `f`; returns the globals and the loaded values
    (placeholders wherever a global was involved)."""
    names: set[str] = set()
    values = []
    for _ in range(count):
        u = _ScanUnpickler(f)
        try:
            values.append(u.load())
        except _Refused as e:
            raise CheckpointError(f"refusing to load: it asks to call {e.name}, which a checkpoint "
                                  "never needs (untrusted file?)", path) from None
        except Exception as e:  # anything a malformed pickle raises
            raise CheckpointError(f"corrupt or truncated pickle ({type(e).__name__}: {e}); "
                                  "download it again", path) from None
        names |= u.names
        if len(values) == 1 and values[0] != _LEGACY_MAGIC:
            break  # a plain pickle, not torch's legacy sequence of magic/version/sys_info/data
    return names, values


def _zip_data_pkl(path: str) -> bytes:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pkl:
                script = any(n.endswith("constants.pkl") for n in names)
                what = "a TorchScript archive" if script else "a zip archive"
                raise CheckpointError(f"{what} without data.pkl, not a torch.save checkpoint; pass the "
                                      "model's .ckpt or .safetensors file", path)
            return z.read(min(pkl, key=len))
    except zipfile.BadZipFile:
        # The central directory sits at the end of a zip, so a cut-short download loses it first.
        raise CheckpointError("truncated file (zip central directory missing or damaged); download it again",
                              path) from None


def sniff(path: str) -> str:
    """'zip' (torch.save), 'pickle' (legacy torch.save or a plain pickle), 'empty' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def scan_globals(path: str) -> set[str]:
    """Every global the checkpoint's pickle names; CheckpointError on the first one not allowed."""
    kind = sniff(path)
    if kind == "zip":
        names, _ = _scan_stream(io.BytesIO(_zip_data_pkl(path)), path, 1)
        return names
    if kind == "pickle":
        with open(path, "rb") as f:
            names, values = _scan_stream(f, path, 4)
        if values[0] != _LEGACY_MAGIC:
            raise CheckpointError("a plain pickle, not a torch.save checkpoint; tensors pickled this way "
                                  "cannot be loaded without running code from the file", path)
        return names
    raise CheckpointError("not a PyTorch checkpoint (neither a zip archive nor a pickle)", path)


def _registrations(names: set[str]) -> Iterator[tuple[Any, str]]:
    for name, obj in NUMPY_GLOBALS.items():
        yield obj, name
    for name in names:
        if is_inert(name):
            yield stub_for(name), name


def _reason(e: BaseException) -> str:
    """The useful line of torch's multi-paragraph weights-only error."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = text.split(" Please use `torch.serialization", 1)[0]  # advice to allow-list it: not ours to give
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def load_torch_file(path: str | os.PathLike) -> Any:
    """The unpickled top-level object of a torch.save file, loaded without executing its code.

    Zip checkpoints are memory-mapped (mmap=True), so a 4 GB file is not copied into memory.
    """
    path = os.fspath(path)
    names = scan_globals(path)
    zipped = sniff(path) == "zip"
    try:
        with torch.serialization.safe_globals(list(_registrations(names))):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load: {_reason(e)} (untrusted file?)", path) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"truncated or corrupt file ({_reason(e)}); download it again", path) from None


__all__ = ["INERT_PREFIXES", "INERT_NAMES", "TORCH_GLOBALS", "NUMPY_GLOBALS", "InertStub", "is_inert",
           "load_torch_file", "scan_globals", "sniff", "stub_for"]
