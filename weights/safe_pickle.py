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

import io
import mmap
import os
import pickle
import struct
import tarfile
from typing import Any, Iterator

import torch

from weights.errors import CheckpointError
from weights.pickle_limits import MAX_PICKLE_BYTES, SourceEnded, check_pickle
from weights.pickle_names import (_LEGACY_MAGIC, _LEGACY_PROTOCOL, INERT_NAMES, INERT_PREFIXES, NUMPY_GLOBALS,
                                  TORCH_GLOBALS, InertStub, is_inert, stub_for)
from weights.pickle_scan import _Budget, _judge, _Scan, _scan_one, _short
from weights.torch_zip import TorchZip, agree_with_torch, open_torch_zip




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
