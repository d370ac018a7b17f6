"""The scan that runs before torch unpickles anything (weights/safe_pickle.py): a global outside the allow-list
(weights/pickle_names.py) is refused by name, every other one becomes an inert model of itself, and the calls
the pickle makes are modelled: the storages it declares, tensor views that must stay inside them, and bytes
copied, each against a budget bounded by the file."""
from __future__ import annotations

import _compat_pickle
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from weights.errors import CheckpointError
from weights.pickle_limits import MAX_TENSORS
from weights.pickle_names import (_DTYPES, _MAX_DIMS, _NEVER_CALLED, _STORAGE_DTYPES, _TENSOR_CLASSES, _UNTYPED,
                                  NUMPY_GLOBALS, TORCH_GLOBALS, is_inert)


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
