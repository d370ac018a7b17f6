"""Reading a checkpoint file into a flat `{key: tensor}` dict, whatever format it came in.

`.safetensors` files are memory-mapped: the returned tensors are views into one private (copy-on-
write) mapping of the file, so a 4 GB checkpoint costs page cache, not a second copy in memory.
`.ckpt`/`.pt`/`.pth` pickles go through `weights.safe_pickle`, which refuses anything but tensors.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from weights.errors import CheckpointError, PathLike
from weights.safe_pickle import load_torch_file, sniff

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

_ST_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
        ("BOOL", "bool"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("C64", "complex64"),
    ]
    if hasattr(torch, attr)
}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit; a larger "length" means not safetensors


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section (after the header)
    end: int


def _checked_path(path: PathLike) -> str:
    p = Path(path)
    if not p.exists():
        raise CheckpointError("file not found; check the path", path)
    if p.is_dir():
        hint = (" (a diffusers folder: this project reads the single-file .safetensors/.ckpt instead)"
                if (p / "model_index.json").exists() else "")
        raise CheckpointError(f"is a directory, not a checkpoint file{hint}; pass the .safetensors or "
                              ".ckpt file itself", path)
    if p.suffix.lower() not in SUFFIXES:
        raise CheckpointError(f"unknown checkpoint extension '{p.suffix}'; expected one of "
                              f"{', '.join(SUFFIXES)}", path)
    if p.stat().st_size == 0:
        raise CheckpointError("empty file (0 bytes); download it again", path)
    return os.fspath(path)


def _looks_like_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER and head[8:9] == b"{"


def _not_a_checkpoint(path: str) -> CheckpointError:
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        what = ("a Git LFS pointer, not the weights; fetch the real file (git lfs pull, or download it "
                "directly)")
    elif head.lstrip()[:1] == b"<":
        what = "an HTML/XML page, not a checkpoint (a failed download?); download the file again"
    elif head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        what = "an image, not a checkpoint; pass the model file"
    else:
        what = (f"not a checkpoint (starts with {head[:8]!r}; expected safetensors, a torch zip archive "
                "or a torch pickle); download it again")
    return CheckpointError(what, path)


def _parse_safetensors(path: str) -> tuple[dict[str, _Entry], dict, int, int]:
    """(entries, __metadata__, data start, file size), every offset checked against the file size."""
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(f"truncated file ({size} bytes, shorter than the safetensors header "
                              "length); download it again", path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > _MAX_HEADER:
            raise _not_a_checkpoint(path)
        if 8 + n > size:
            if f.read(1) == b"{":
                raise CheckpointError(f"truncated file (the header alone needs {8 + n} bytes, the file has "
                                      f"{size}); download it again", path)
            raise _not_a_checkpoint(path)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _not_a_checkpoint(path) from None
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header (not a JSON object); download it again", path)
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    entries = {}
    for key, info in header.items():
        entries[key] = _entry(key, info, data_len, path)
    return entries, metadata, data_start, size


def _entry(key: str, info: object, data_len: int, path: str) -> _Entry:
    try:
        dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(s) for s in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"corrupt safetensors header entry for '{key}': {info!r}", path) from None
    if dtype_name not in _ST_DTYPES:
        raise CheckpointError(f"tensor '{key}' has dtype {dtype_name}, which this reader does not support",
                              path)
    dtype = _ST_DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
        raise CheckpointError(f"corrupt safetensors header: '{key}' {dtype_name}{list(shape)} needs {nbytes} "
                              f"bytes but its offsets span {end - begin}; download it again", path)
    if end > data_len:
        raise CheckpointError(f"truncated file (tensor '{key}' ends at data byte {end}, the file holds "
                              f"{data_len}); download it again", path)
    return _Entry(dtype, shape, begin, end)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    entries, _, data_start, size = _parse_safetensors(path)
    # shared=False maps the file MAP_PRIVATE: pages load on first touch, writes never reach the file.
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    out = {}
    for key, e in entries.items():
        start = data_start + e.begin
        # One storage per tensor (a view into the mapping, as torch.load(mmap=True) makes them), so
        # torch.save and safetensors see separate tensors rather than one buffer read as many dtypes.
        piece = storage[start:data_start + e.end]
        if start % e.dtype.itemsize == 0:
            t = torch.empty(0, dtype=e.dtype).set_(piece, 0, e.shape, _contiguous_strides(e.shape))
        else:
            # The format does not promise alignment; a misaligned tensor gets its own aligned copy.
            raw = torch.empty(0, dtype=torch.uint8).set_(piece, 0, (e.end - e.begin,), (1,))
            t = raw.clone().view(e.dtype).reshape(e.shape)
        out[key] = t
    return out


def _state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"top level is a {type(obj).__name__}, not a dict of tensors", path)
    inner = obj.get("state_dict")
    sd = inner if isinstance(inner, dict) else obj
    out = {}
    for k, v in sd.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            out[k] = v.detach() if isinstance(v, torch.nn.Parameter) else v
    if not out:
        raise CheckpointError("contains no tensors (no state_dict and no tensor entries)", path)
    return out


def _kind(path: str) -> str:
    """'safetensors' or 'torch', from the content (renamed files are common), else an error."""
    sniffed = sniff(path)
    if sniffed in ("zip", "pickle"):
        if path.lower().endswith(".safetensors"):
            # torch.load hands any *.safetensors path to the safetensors reader, whatever it holds
            raise CheckpointError("is a PyTorch pickle saved under a .safetensors name; rename it to .ckpt",
                                  path)
        return "torch"
    if _looks_like_safetensors(path) or (path.lower().endswith(".safetensors") and os.path.getsize(path) < 9):
        return "safetensors"
    raise _not_a_checkpoint(path)


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """Every failure while reading a file is a CheckpointError that names it: a mutated or truncated file
    can fail anywhere in zip, pickle, JSON or tensor code (struct.error, zlib.error, RecursionError, ...),
    and nothing but the one error type may leave the reader. Memory exhaustion and Ctrl-C pass through."""
    try:
        yield
    except (CheckpointError, MemoryError):
        raise
    except OSError as e:
        if e.errno is None:  # zip and gzip code raise bare OSErrors for corrupt data
            raise CheckpointError(f"corrupt file ({e}); download it again", path) from None
        raise CheckpointError(f"cannot be read ({e.strerror or e}); check its permissions and the disk", path) from None
    except Exception as e:
        raise CheckpointError(f"corrupt or not a checkpoint ({type(e).__name__}: {str(e)[:200]}); download it "
                              "again", path) from None


def read_checkpoint(path: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, `state_dict` unwrapped, non-tensor entries left out."""
    p = _checked_path(path)
    with _reading(p):
        if _kind(p) == "safetensors":
            return _read_safetensors(p)
        return _state_dict(load_torch_file(p), p)


def read_header(path: PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)}. For safetensors only the header is read; a pickle has to be loaded
    (memory-mapped, so tensor data is still not read)."""
    p = _checked_path(path)
    with _reading(p):
        if _kind(p) == "safetensors":
            entries, *_ = _parse_safetensors(p)
            return {k: (e.shape, e.dtype) for k, e in entries.items()}
        return {k: (tuple(t.shape), t.dtype) for k, t in _state_dict(load_torch_file(p), p).items()}


def read_metadata(path: PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} for pickles, which have none)."""
    p = _checked_path(path)
    with _reading(p):
        return dict(_parse_safetensors(p)[1]) if _kind(p) == "safetensors" else {}
