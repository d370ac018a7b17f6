"""numpy scalars, dtypes and arrays in a checkpoint, rebuilt from plain values, never by numpy's unpickling.

Lightning checkpoints carry numpy values beside the weights (`global_step` is often an `np.int64`). numpy
pickles them as `scalar(dtype, bytes)`, `dtype(code, align, copy)` + BUILD state, and
`_reconstruct(ndarray, ...)` + BUILD state. Handing that BUILD state to numpy's own `__setstate__` lets a
file give a dtype object fields without numpy recomputing `hasobject`; a scalar made from the file's bytes
then dereferences a pointer the file chose (a segfault, or worse). So the names a file may use map to the
stand-ins below: a dtype is only ever `np.dtype(code)` of a plain number type (bool, int, uint, float,
complex) with a byte order, and scalars and arrays are made by `np.frombuffer` on such a dtype, with
their sizes checked. Anything else is refused with an UnpicklingError.
"""
from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np

SIMPLE_KINDS = "biufc"  # bool, signed and unsigned ints, floats, complex: fixed size, no pointers
_REFUSED = "refusing numpy value"


class Dtype:
    """Stands for `numpy.dtype(code, align, copy)`: takes only plain number codes, and of the BUILD state
    only the byte order (numpy's own `__setstate__` is what a hostile file would abuse)."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        if not isinstance(code, str) or len(code) > 8:
            raise pickle.UnpicklingError(f"{_REFUSED}: dtype {code!r} is not a plain number type")
        try:
            dtype = np.dtype(code)
        except TypeError:
            raise pickle.UnpicklingError(f"{_REFUSED}: {code!r} is not a numpy dtype") from None
        if dtype.kind not in SIMPLE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise pickle.UnpicklingError(f"{_REFUSED}: dtype {code!r} ({dtype.kind}) is not a plain number type")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[2:5] == (None, None, None)
                and state[1] in ("<", ">", "|", "=")):
            raise pickle.UnpicklingError(f"{_REFUSED}: a dtype state with fields or sub-arrays ({state!r:.80})")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _dtype_of(value: Any) -> np.dtype:
    if not isinstance(value, Dtype):
        raise pickle.UnpicklingError(f"{_REFUSED}: expected a dtype, got {type(value).__name__}")
    return value.dtype


def scalar(dtype: Any, data: Any = None) -> np.generic:
    """Stands for `numpy.core.multiarray.scalar`: the value in `data`'s bytes, read as a plain dtype."""
    dt = _dtype_of(dtype)
    if not isinstance(data, (bytes, bytearray)) or len(data) != dt.itemsize:
        raise pickle.UnpicklingError(f"{_REFUSED}: a {dt} scalar needs {dt.itemsize} bytes")
    return np.frombuffer(bytes(data), dtype=dt)[0]


class Array(np.ndarray):
    """Stands for the arrays numpy unpickles: `_reconstruct` makes an empty one, and its BUILD state
    (version, shape, dtype, fortran order, raw bytes) is checked before numpy sees it."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple)
                and all(isinstance(n, int) and 0 <= n for n in state[1]) and isinstance(state[4], (bytes, bytearray))):
            raise pickle.UnpicklingError(f"{_REFUSED}: an array state that is not shape, dtype and raw bytes")
        version, shape, dtype, fortran, raw = state
        dt = _dtype_of(dtype)
        if math.prod(shape) * dt.itemsize != len(raw):
            raise pickle.UnpicklingError(f"{_REFUSED}: {len(raw)} bytes for a {shape} array of {dt}")
        super().__setstate__((version, shape, dt, bool(fortran), bytes(raw)))


def reconstruct(cls: Any, shape: Any = (0,), code: Any = b"b") -> Array:
    """Stands for `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`: an empty array to BUILD."""
    if cls is not Array:
        raise pickle.UnpicklingError(f"{_REFUSED}: only plain arrays are rebuilt")
    return np.empty(0, dtype=np.uint8).view(Array)


def numpy_globals() -> dict[str, Any]:
    """The stand-ins under the names files use: numpy 1 wrote `numpy.core.multiarray`, numpy 2 writes
    `numpy._core.multiarray`; files of both are in circulation."""
    out: dict[str, Any] = {"numpy.dtype": Dtype, "numpy.ndarray": Array}
    for core in ("numpy.core", "numpy._core"):
        out[f"{core}.multiarray.scalar"] = scalar
        out[f"{core}.multiarray._reconstruct"] = reconstruct
    return out
