"""Reading `.ckpt`/`.pt`/`.pth` pickles without running anything the file asks for, and without letting the
file decide how much memory the read takes.

A pickle is a program: every global it names is something the unpickler imports and may call, and every
number in it (a memo index, a length, a tensor's size) is an allocation it may ask for. Official SD
checkpoints only need tensors, storages, `OrderedDict`, a few numpy scalars and the Lightning callback
objects the training run saved beside the weights. Four gates stand between the file and the interpreter:

1. the container: a zip archive is checked by `weights.torch_zip` (members stored, inside the file, seen
   alike by Python's zipfile and torch's miniz); a legacy (non-zip) file is memory-mapped;
2. `weights.pickle_limits` walks every pickle's opcodes before anything is unpickled (only the opcodes
   torch's restricted unpickler implements, memo indices that exist, bounded nesting, opcode count and
   size);
3. `scan` unpickles the file once with every global replaced by an inert model of itself, so it can
   name each global the file uses and refuse the first one outside the allow-list, and check every call
   the real load would make before anything real is built: each tensor must lie inside its storage
   (offset + sum((size-1)*stride) + 1 elements) with no more elements than the storage holds (no
   stride-0 "expanded" giants), sizes and strides non-negative; each storage the pickle declares must be
   backed by the file (a zip member `data/<key>` of at least its bytes; in a legacy file, the size record
   before its bytes, all of them inside the file); no call may build an object from a size alone
   (`bytearray(n)`, `torch.Tensor(n)`, a storage class, `numpy.ndarray(shape)`), and the bytes the calls
   that do copy (`_codecs.encode`, `bytearray(b)`, a device copy) are budgeted against the file's size;
4. the load itself is `torch.load(weights_only=True)` (torch's own restricted unpickler), with
   do-nothing stand-ins for training-only classes and the numpy stand-ins of weights/numpy_values.py
   (numpy values rebuilt from plain ones, never by numpy's own unpickling) registered for the duration.

So what a file can make the reader allocate is bounded by the file: the storages it declares (each no
larger than the bytes backing it; zip storages are views into a private mapping of the file, legacy ones
are read into memory) plus the unpicklers' objects, in proportion to the pickle's opcodes.
"""
from __future__ import annotations

import _compat_pickle
import io
import math
import mmap
import os
import pickle
import struct
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from weights.errors import CheckpointError
from weights.numpy_values import numpy_globals
from weights.pickle_limits import MAX_PICKLE_BYTES, MAX_TENSORS, SourceEnded, check_pickle
from weights.torch_zip import TorchZip, agree_with_torch, open_torch_zip

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


# ---------------------------------------------------------------- the scan: every global an inert model


class _Refused(Exception):
    """The scan's verdict; `message` is the CheckpointError's text."""


@dataclass(frozen=True)
class _StorageRef:
    """A storage the pickle declares: `nbytes` of `dtype` elements, backed by zip member data/<key> or, in a
    legacy file, by the bytes after the pickles."""
    key: str
    dtype: torch.dtype
    nbytes: int

    def __setstate__(self, state: Any) -> None:  # BUILD would write the fields above
        raise _Refused("it sets a storage's state, which torch.save never writes")

    def __repr__(self) -> str:
        return f"<storage {self.key!r}>"


class _TensorRef:
    """What a tensor is during the scan: its dtype and element count."""

    __slots__ = ("dtype", "numel")

    def __init__(self, dtype: torch.dtype, numel: int):
        self.dtype, self.numel = dtype, numel

    def __repr__(self) -> str:
        return f"<{self.dtype} tensor of {self.numel} elements>"

    def __setstate__(self, state: Any) -> None:
        # torch's BUILD on a tensor is `set_(*state)` (or Tensor.__setstate__, which calls it): the file
        # re-points the tensor at any storage, offset and size, growing a legacy storage to fit.
        raise _Refused("it sets a tensor's state after rebuilding it, which torch.save never writes")


class _Bytes:
    """What `_codecs.encode` and `bytearray` give during the scan: a length, no copy."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


class _Global:
    """What every global becomes during the scan: a class (NEWOBJ needs one) whose construction is the
    scan's model of calling it; inert as an instance (BUILD, SETITEM and APPEND do nothing)."""

    _name = ""
    _scan: "_Scan"

    def __new__(cls, *args: Any, **kwargs: Any):
        return cls._scan.call(cls, args)

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


@dataclass
class _Budget:
    """Bytes the scan lets calls copy: strings to bytes (bounded by the pickle) and device copies of
    tensors (bounded by the file)."""
    encoded: int
    copied: int


@dataclass
class _Scan:
    path: str
    legacy: bool
    budget: _Budget
    names: set[str] = field(default_factory=set)
    storages: dict[str, _StorageRef] = field(default_factory=dict)  # root storages, by key
    views: dict[str, _StorageRef] = field(default_factory=dict)  # legacy views of root storages
    classes: dict[str, type] = field(default_factory=dict)
    tensors: int = 0

    def global_class(self, full: str) -> type:
        if full not in self.classes:
            module, _, qualname = full.rpartition(".")
            self.classes[full] = type(qualname, (_Global,), {"_name": full, "_scan": self, "__module__": module})
        return self.classes[full]

    # -- persistent ids: the storages

    def storage(self, pid: Any) -> _StorageRef:
        fields = 6 if self.legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == fields and pid[0] in ("storage", b"storage")):
            raise _Refused(f"a persistent id that is not a storage record ({_short(pid)})")
        storage_type, key, location, numel = pid[1:5]
        name = storage_type._name if isinstance(storage_type, type) and issubclass(storage_type, _Global) else None
        dtype = torch.uint8 if name in _UNTYPED and not self.legacy else _STORAGE_DTYPES.get(name)
        if dtype is None:
            raise _Refused(f"a storage of type {_short(name or storage_type)}, which a checkpoint never holds")
        if type(key) is not str or not isinstance(location, (str, bytes)) or type(numel) is not int or numel < 0:
            raise _Refused(f"a malformed storage record ({_short(pid)})")
        root = _StorageRef(key, dtype, numel * dtype.itemsize)
        known = self.storages.setdefault(key, root)
        if known != root:
            raise _Refused(f"storage {key!r} declared twice, with different types or sizes")
        if not self.legacy or pid[5] is None:
            return root
        view = pid[5]
        if not (isinstance(view, tuple) and len(view) == 3 and type(view[0]) is str
                and all(type(v) is int and v >= 0 for v in view[1:])):
            raise _Refused(f"a malformed storage view ({_short(view)})")
        view_key, offset, count = view
        if (offset + count) * dtype.itemsize > root.nbytes:
            raise _Refused(f"a view of storage {key!r} that ends past it")
        ref = _StorageRef(key, dtype, count * dtype.itemsize)
        if self.views.setdefault(view_key, ref) != ref:
            raise _Refused(f"storage view {view_key!r} declared twice, differently")
        return ref

    # -- calls

    def call(self, cls: type, args: tuple) -> Any:
        name = cls._name
        if name in _NEVER_CALLED:
            raise _Refused(f"it calls {name} with {_short(args)}, which builds an object from sizes, not from the "
                           "file's data (torch.save never writes that)")
        if name in ("torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
                    "torch._utils._rebuild_tensor_v3"):
            return self.rebuild(name, args)
        if name in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
            n = 3 if name.endswith("parameter") else 4
            if len(args) != n or not isinstance(args[0], _TensorRef) or not _no_hooks(args[2]):
                raise _Refused(f"{name} with arguments it does not take ({_short(args)})")
            return args[0]
        if name == "torch.nn.parameter.Parameter":
            if len(args) > 2 or (args and not isinstance(args[0], _TensorRef)):
                raise _Refused(f"a Parameter made of something other than a tensor ({_short(args)})")
            return args[0] if args else _TensorRef(torch.float32, 0)
        if name == "torch._utils._rebuild_device_tensor_from_cpu_tensor":
            if len(args) != 4 or not isinstance(args[0], _TensorRef) or _dtype_of(args[1]) is None:
                raise _Refused(f"{name} with arguments it does not take ({_short(args)})")
            dtype = _dtype_of(args[1])
            self.spend("copied", args[0].numel * dtype.itemsize, "copies of tensors")
            return _TensorRef(dtype, args[0].numel)
        if name == "torch._tensor._rebuild_from_type_v2":
            if not (len(args) == 4 and isinstance(args[0], type) and issubclass(args[0], _Global)
                    and isinstance(args[2], tuple) and getattr(args[1], "_name", None) in _TENSOR_CLASSES):
                raise _Refused(f"{name} with arguments it does not take ({_short(args)})")
            made = args[0](*args[2])
            if not isinstance(made, _TensorRef):
                raise _Refused(f"{name} around {args[0]._name}, which does not rebuild a tensor")
            return made
        if name == "torch.Size":
            if len(args) > 1 or (args and not (isinstance(args[0], (tuple, list))
                                                and all(type(s) is int for s in args[0]))):
                raise _Refused(f"a torch.Size of something other than integers ({_short(args)})")
            return tuple(args[0]) if args else ()
        if name == "_codecs.encode":
            if not (1 <= len(args) <= 3 and isinstance(args[0], str)):
                raise _Refused(f"_codecs.encode of something other than a string ({_short(args)})")
            latin = len(args) > 1 and str(args[1]).lower().replace("-", "").replace("_", "") in ("latin1", "iso88591")
            self.spend("encoded", len(args[0]) * (1 if latin else 4), "bytes made from its strings")
            return _Bytes(len(args[0]))
        if name == "builtins.bytearray":
            if not args:
                return _Bytes(0)
            if len(args) > 3 or not isinstance(args[0], (_Bytes, str)):
                raise _Refused(f"bytearray of {_short(args[0])} (a bytearray is only ever made from bytes)")
            n = args[0].n if isinstance(args[0], _Bytes) else 4 * len(args[0])
            self.spend("encoded", n, "bytes made from its strings")
            return _Bytes(n)
        if name == "collections.OrderedDict":
            try:
                return OrderedDict(*args)
            except (TypeError, ValueError):
                raise _Refused(f"an OrderedDict of {_short(args)}") from None
        return object.__new__(cls)  # everything else is inert: devices, numpy values, training stubs

    def spend(self, what: str, n: int, label: str) -> None:
        left = getattr(self.budget, what) - n
        if left < 0:
            raise _Refused(f"its {label} would take more bytes than the file holds (a memory bomb?)")
        setattr(self.budget, what, left)

    def rebuild(self, name: str, args: tuple) -> _TensorRef:
        n = {"_rebuild_tensor": (4,), "_rebuild_tensor_v2": (6, 7), "_rebuild_tensor_v3": (7, 8)}[name.rsplit(".", 1)[1]]
        if len(args) not in n:
            raise _Refused(f"{name} with {len(args)} arguments (it takes {' or '.join(map(str, n))})")
        dtype = None
        if name.endswith("v3"):
            dtype = _dtype_of(args[6])
            if dtype is None:
                raise _Refused(f"{name} with dtype {_short(args[6])}")
        if len(args) > 4 and (type(args[4]) is not bool or not _no_hooks(args[5])):
            raise _Refused(f"{name} with a requires_grad or backward hooks torch.save never writes ({_short(args[4:6])})")
        return self.tensor(*args[:4], dtype, name)

    def tensor(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None,
               what: str) -> _TensorRef:
        """The check of `torch.empty(0, dtype).set_(storage, offset, size, stride)`: a tensor that stays
        inside its storage, never resizing it (a legacy file's storages would grow)."""
        if not isinstance(storage, _StorageRef):
            raise _Refused(f"{what} whose storage is {_short(storage)}, not one of the file's storages")
        if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) == len(stride)
                and len(size) <= _MAX_DIMS and type(offset) is int):
            raise _Refused(f"{what} with a malformed offset, size or stride ({_short((offset, size, stride))})")
        if offset < 0 or not all(type(v) is int and v >= 0 for v in (*size, *stride)):
            raise _Refused(f"{what} with a negative or non-integer size, stride or offset "
                           f"({_short((offset, size, stride))})")
        self.tensors += 1
        if self.tensors > MAX_TENSORS:
            raise _Refused(f"it holds more than {MAX_TENSORS:,} tensors (an SD checkpoint has a few thousand)")
        dtype = dtype or storage.dtype
        numel = math.prod(size)
        capacity = storage.nbytes // dtype.itemsize
        if numel:
            span = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
            if span > capacity:
                raise _Refused(f"a {list(size)} tensor at offset {offset} reaches element {span:,} of a storage "
                               f"of {capacity:,}")
            if numel > capacity:
                raise _Refused(f"a {list(size)} tensor (strides {list(stride)}) has {numel:,} elements, more "
                               f"than the {capacity:,} of its storage (an expanded tensor)")
        return _TensorRef(dtype, numel)


def _no_hooks(hooks: Any) -> bool:
    return hooks is None or (isinstance(hooks, dict) and not hooks)


def _dtype_of(obj: Any) -> torch.dtype | None:
    return _DTYPES.get(getattr(obj, "_name", None))


def _short(obj: Any) -> str:
    if isinstance(obj, type) and issubclass(obj, _Global):
        return obj._name
    if isinstance(obj, _Global):
        return f"<{type(obj)._name} object>"
    try:
        text = repr(obj)
    except Exception:
        text = type(obj).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed(module: str, name: str) -> str:
    """The global's full name, or _Refused when it is outside the allow-list."""
    # Protocol 2 files spell Python 3 names the Python 2 way (`__builtin__.eval`); map them back
    # as torch's unpickler does, so both gates judge the same name.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    full = f"{module}.{name}"
    if not (full in TORCH_GLOBALS or full in NUMPY_GLOBALS or is_inert(full)):
        raise _Refused(f"it asks to call {full}, which a checkpoint never needs (untrusted file?)")
    return full


def _judge(path: str):
    """For the opcode walk: refuse a global outside the allow-list by name, before anything unpickles."""
    def judge(module: str, name: str) -> None:
        try:
            _allowed(module, name)
        except _Refused as e:
            raise CheckpointError(f"refusing to load: {e}", path) from None
    return judge


class _ScanUnpickler(pickle.Unpickler):
    """Collects the globals a pickle names and models the calls it makes; never imports or calls any."""

    def __init__(self, file: Any, scan: _Scan):
        super().__init__(file, encoding="utf-8")  # as torch.load unpickles
        self.scan = scan

    def find_class(self, module: str, name: str) -> type:
        full = _allowed(module, name)
        self.scan.names.add(full)
        return self.scan.global_class(full)

    def persistent_load(self, pid: Any) -> Any:
        return self.scan.storage(pid)


def _scan_one(source: Any, scan: _Scan) -> Any:
    try:
        return _ScanUnpickler(source, scan).load()
    except _Refused as e:
        raise CheckpointError(f"refusing to load: {e}", scan.path) from None
    except RecursionError:
        raise CheckpointError("refusing to load: its pickle nests objects too deeply", scan.path) from None
    except Exception as e:  # anything a malformed pickle raises
        raise CheckpointError(f"corrupt or truncated pickle ({type(e).__name__}: {str(e)[:200]}); "
                              "download it again", scan.path) from None


# ---------------------------------------------------------------- the two container formats


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


def _scan_zip(path: str) -> tuple[set[str], TorchZip]:
    z = open_torch_zip(path)
    check_pickle(z.pickle, path, "data.pkl", _judge(path))
    size = os.path.getsize(path)
    scan = _Scan(path, legacy=False, budget=_Budget(encoded=len(z.pickle) + 2**20, copied=size))
    _scan_one(io.BytesIO(z.pickle), scan)
    for key, ref in scan.storages.items():
        have = z.storage_size(key)
        if have is None:
            raise CheckpointError(f"corrupt file: the pickle names storage {key!r}, which the archive does not "
                                  f"hold (no {z.prefix}/data/{key}); download it again", path)
        if ref.nbytes > have:
            raise CheckpointError(f"corrupt file: storage {key!r} is declared {ref.nbytes:,} bytes but the archive "
                                  f"holds {have:,}; download it again", path)
    agree_with_torch(z, path, list(scan.storages))
    return scan.names, z


def _looks_like_tar(head: bytes) -> bool:
    """torch.load first tries a legacy file as a tar archive (torch < 0.4), whose headers carry sizes it
    reads in full; such files are refused before torch sees them."""
    if len(head) < tarfile.BLOCKSIZE:
        return False
    try:
        tarfile.TarInfo.frombuf(head[:tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
    except Exception:
        return False
    return True


def _walk(mm: mmap.mmap, pos: int, path: str, what: str) -> int:
    """check_pickle on the pickle starting at `pos`, which must end within MAX_PICKLE_BYTES of the file's
    start: first over a copy of the next 4 MB (genops reads a bytes buffer far faster than a file), then,
    if the pickle runs on, over all it may take."""
    limit = min(len(mm), MAX_PICKLE_BYTES)
    for window in (4 * 2**20, limit):
        stop = min(limit, pos + window)
        try:
            return pos + check_pickle(mm[pos:stop], path, what, _judge(path))
        except SourceEnded:
            if stop == limit:
                raise
    raise AssertionError("unreachable")


def _scan_legacy(path: str) -> set[str]:
    """torch.save(_use_new_zipfile_serialization=False): pickles of the magic number, the protocol, the
    system info, the data, and the list of storage keys; then each storage as an 8-byte element count and
    its bytes, in the list's order."""
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if _looks_like_tar(mm[:tarfile.BLOCKSIZE]):
            raise CheckpointError("refusing to load: a tar archive (torch's pre-0.4 format), which torch's "
                                  "restricted unpickler cannot read", path)
        scan = _Scan(path, legacy=True, budget=_Budget(encoded=0, copied=size))
        pos, values = 0, []
        for i, what in enumerate(("magic number", "protocol version", "system info", "pickle", "storage list")):
            end = _walk(mm, pos, path, f"{what} pickle")
            scan.budget.encoded += end - pos + 2**20
            values.append(_scan_one(io.BytesIO(mm[pos:end]), scan))
            pos = end
            if i == 0 and values[0] != _LEGACY_MAGIC:
                raise CheckpointError("a plain pickle, not a torch.save checkpoint; tensors pickled this way "
                                      "cannot be loaded without running code from the file", path)
            if i == 1 and values[1] != _LEGACY_PROTOCOL:
                raise CheckpointError(f"unknown legacy torch format version {_short(values[1])}; download it "
                                      "again", path)
        keys = values[4]
        if not (isinstance(keys, list) and all(type(k) is str for k in keys)) or len(set(keys)) != len(keys):
            raise CheckpointError("corrupt file: its storage list is not a list of distinct storage keys; download "
                                  "it again", path)
        if set(keys) != set(scan.storages):
            missing = sorted(set(scan.storages) - set(keys)) or sorted(set(keys) - set(scan.storages))
            raise CheckpointError(f"corrupt file: the pickle's storages and the storage list disagree (about "
                                  f"{_short(missing[:3])}); download it again", path)
        for key in keys:  # each storage: an element count, then its bytes; all inside the file
            ref = scan.storages[key]
            if pos + 8 > size:
                raise CheckpointError(f"truncated file (storage {key!r} starts past the end); download it again",
                                      path)
            (count,) = struct.unpack("<q", mm[pos:pos + 8])
            if count * ref.dtype.itemsize != ref.nbytes:
                raise CheckpointError(f"corrupt file: storage {key!r} is declared {ref.nbytes:,} bytes but its "
                                      f"record says {count:,} elements; download it again", path)
            pos += 8 + ref.nbytes
            if pos > size:
                raise CheckpointError(f"truncated file (storage {key!r} ends at byte {pos:,}, the file has "
                                      f"{size:,}); download it again", path)
    return scan.names


def scan_globals(path: str) -> set[str]:
    """Every global the checkpoint's pickle names, after every check above; CheckpointError on the first
    one that fails."""
    kind = sniff(path)
    if kind == "zip":
        return _scan_zip(path)[0]
    if kind == "pickle":
        return _scan_legacy(path)
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
