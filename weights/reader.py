"""Reading a checkpoint file into a flat `{key: tensor}` dict, whatever format it came in.

`.safetensors` files are memory-mapped: the returned tensors are views into one private (copy-on-
write) mapping of the file, so a 4 GB checkpoint costs page cache, not a second copy in memory. What is
a valid safetensors file is the safetensors library's decision (`safe_open`), layout included; see the
note above `_Layout` for the three refusals that are ours alone.
`.ckpt`/`.pt`/`.pth` pickles go through `weights.safe_pickle`, which refuses anything but tensors and any
file that would make the read allocate more than the file holds; every tensor that leaves the reader
lies inside its storage, with no more elements than the storage (no stride-0 "expanded" giants).

Whatever goes wrong, the one exception that leaves `read_checkpoint`, `read_header` and `read_metadata`
is a CheckpointError whose single line names the file (MemoryError and Ctrl-C pass through).
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
from weights.pickle_limits import MAX_TENSORS
from weights.safe_pickle import load_torch_file, sniff

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

_ST_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
        ("BOOL", "bool"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"), ("C64", "complex64"),
    ]
    if hasattr(torch, attr)
}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit; a larger "length" means not safetensors
MAX_HEADER_BYTES = 16 * 2**20  # ours: an SD checkpoint's header takes ~100-300 KB
_JSON_SPACE = b" \t\n\r"  # what may precede the header's "{" (the library accepts it)
_INT64 = 2**63


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
    return len(head) == 9 and struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER and head[8:9] in (b"{", *[
        bytes([c]) for c in _JSON_SPACE])


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


# ---------------------------------------------------------------- safetensors
#
# The safetensors library decides what a valid file is: `safe_open` validates the header in Rust (JSON
# syntax and types, a known dtype, sizes that match the shapes, data ranges that tile the data section
# with no overlap, gap or trailing byte). Its verdict is ours, and the layout (keys in offset order,
# shapes, dtypes, metadata) is read from it too, so there is no second JSON parser to disagree with it;
# the tensors are then views into a private mapping of the file (zero-copy), placed by that layout. Four
# refusals are ours alone, for files the library accepts:
# - a dtype with no whole-byte torch type (F4, F6_E2M3, F6_E3M2: packed sub-byte floats);
# - a shape whose element count or strides overflow torch's int64 (only possible with a zero-sized
#   dimension beside a huge one);
# - a header over MAX_HEADER_BYTES (16 MB; the format allows 100 MB): the library parses it whole, and a
#   95 MB header of empty tensors costs it 1.3 GB and 15 s (and aborts the process, uncatchably, when
#   memory runs out);
# - more than MAX_TENSORS tensors (100,000: each costs ~1 KB of Python and torch objects).


@dataclass(frozen=True)
class _Layout:
    entries: dict[str, _Entry]
    metadata: dict[str, str]
    data_start: int
    size: int


def _safetensors(path: str) -> _Layout | str:
    """The layout of a file `safetensors.safe_open` accepts, as the library reads it; else the library's
    reason, in one line."""
    from safetensors import SafetensorError, safe_open

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    if MAX_HEADER_BYTES < n <= _MAX_HEADER:
        # The library would parse it whole: ~14 bytes of memory per byte, for a header of tiny entries
        if 8 + n <= size and head[8:9] in (b"{", *[bytes([c]) for c in _JSON_SPACE]):
            raise CheckpointError(f"refusing to load: its safetensors header takes {n:,} bytes, over the "
                                  f"{MAX_HEADER_BYTES // 2**20} MB this reader reads (an SD checkpoint's takes a "
                                  "few hundred KB)", path)
        return f"a header length of {n:,} bytes"
    try:
        with safe_open(path, framework="pt") as f:
            keys = f.keys()
            if len(keys) > MAX_TENSORS:
                raise CheckpointError(f"refusing to load: it holds {len(keys):,} tensors, more than the "
                                      f"{MAX_TENSORS:,} this reader takes (an SD checkpoint has a few thousand)", path)
            metadata = dict(f.metadata() or {})
            order = f.offset_keys() if hasattr(f, "offset_keys") else None
            specs = {}
            for k in keys:
                piece = f.get_slice(k)
                specs[k] = (piece.get_dtype(), tuple(piece.get_shape()))
    except SafetensorError as e:
        return str(e).replace("Error while deserializing header: ", "").strip() or "refused by safetensors"
    except BaseException as e:  # pyo3's PanicException derives from BaseException
        if type(e).__name__ != "PanicException":
            raise
        return f"the safetensors library failed on its header ({str(e).splitlines()[0][:150] if str(e) else 'panic'})"
    data_start = 8 + n
    if order is None:  # safetensors < 0.5: order by the header's offsets
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(n).decode("utf-8"))
        order = sorted(specs, key=lambda k: _offsets(header[k]))
    entries, begin = {}, 0
    for key in order:
        dtype_name, shape = specs[key]
        dtype = _ST_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"tensor '{key}' has dtype {dtype_name}, which this reader does not support "
                                  "(torch has no whole-byte type for it)", path)
        strides = _contiguous_strides(shape)
        if max(shape, default=0) >= _INT64 or (strides and strides[0] * max(shape[0], 1) >= _INT64):
            raise CheckpointError(f"tensor '{key}' has shape {list(shape)}, too large for a torch tensor", path)
        end = begin + math.prod(shape) * dtype.itemsize
        entries[key] = _Entry(dtype, shape, begin, end)
        begin = end
    if data_start + begin != size:  # the library checked this; a disagreement is a bug, not a file to read
        raise CheckpointError(f"corrupt safetensors file (its tensors cover {begin:,} bytes of a "
                              f"{size - data_start:,}-byte data section)", path)
    return _Layout(entries, metadata, data_start, size)


def _offsets(info: object) -> tuple[int, int]:
    """data_offsets of a header entry in either form serde accepts (an object or a [dtype, shape,
    offsets] array)."""
    offsets = info["data_offsets"] if isinstance(info, dict) else info[2]
    return int(offsets[0]), int(offsets[1])


def _explain_refusal(path: str, reason: str) -> CheckpointError:
    """The library's refusal, in the friendlier words of the common cases (a cut-short download)."""
    size = os.path.getsize(path)
    if size < 8:
        return CheckpointError(f"truncated file ({size} bytes, shorter than the safetensors header length); "
                               "download it again", path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > _MAX_HEADER:
            return _not_a_checkpoint(path)
        if 8 + n > size:
            if f.read(1) in (b"{", *[bytes([c]) for c in _JSON_SPACE]):
                return CheckpointError(f"truncated file (the header alone needs {8 + n} bytes, the file has "
                                       f"{size}); download it again", path)
            return _not_a_checkpoint(path)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), parse_int=lambda s: int(s) if len(s) < 100 else math.inf)
        ends = [_offsets(v)[1] for k, v in header.items() if k != "__metadata__"]
    except Exception:
        ends = []
    if ends and all(isinstance(e, int) for e in ends) and max(ends) > size - 8 - n:
        return CheckpointError(f"truncated file (a tensor ends at data byte {max(ends):,}, the file holds "
                               f"{size - 8 - n:,}); download it again", path)
    return CheckpointError(f"corrupt safetensors header ({reason}); download it again", path)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


def _read_safetensors(path: str, layout: _Layout) -> dict[str, torch.Tensor]:
    data_start = layout.data_start
    # shared=False maps the file MAP_PRIVATE: pages load on first touch, writes never reach the file.
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=layout.size)
    out = {}
    for key, e in layout.entries.items():
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


def _check_tensor(key: str, t: torch.Tensor, path: str) -> None:
    """A loaded tensor must lie inside its storage and have no more elements than it: official checkpoints
    never hold anything else, and a stride-0 "expanded" giant over a tiny storage costs its full size the
    first time anything clones it. (The pickle scan refuses these before loading; this is the last word
    on what leaves the reader.)"""
    if t.layout != torch.strided or t.is_quantized:
        raise CheckpointError(f"tensor '{key}' is {t.layout} / quantized, not a plain dense tensor", path)
    size, stride = t.shape, t.stride()
    if t.storage_offset() < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"tensor '{key}' has a negative size, stride or offset", path)
    numel = t.numel()
    if not numel:
        return
    capacity = t.untyped_storage().nbytes() // t.element_size()
    span = t.storage_offset() + sum((n - 1) * st for n, st in zip(size, stride)) + 1
    if span > capacity or numel > capacity:
        raise CheckpointError(f"refusing to load: tensor '{key}' {list(size)} (strides {list(stride)}) claims "
                              f"{max(span, numel):,} elements of a storage that holds {capacity:,}", path)


def _state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"top level is a {type(obj).__name__}, not a dict of tensors", path)
    inner = obj.get("state_dict")
    sd = inner if isinstance(inner, dict) else obj
    out = {}
    for k, v in sd.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            _check_tensor(k, v, path)
            out[k] = v.detach() if isinstance(v, torch.nn.Parameter) else v
    if not out:
        raise CheckpointError("contains no tensors (no state_dict and no tensor entries)", path)
    return out


def _kind(path: str) -> _Layout | None:
    """The layout of a safetensors file, or None for a torch pickle, from the content (renamed files are
    common); else an error. A file is safetensors when the safetensors library accepts it; one it
    refuses is explained here."""
    layout = _safetensors(path)
    if isinstance(layout, _Layout):
        return layout
    sniffed = sniff(path)
    if sniffed in ("zip", "pickle"):
        if path.lower().endswith(".safetensors"):
            # torch.load hands any *.safetensors path to the safetensors reader, whatever it holds
            raise CheckpointError("is a PyTorch pickle saved under a .safetensors name; rename it to .ckpt",
                                  path)
        return None
    if _looks_like_safetensors(path) or (path.lower().endswith(".safetensors") and os.path.getsize(path) < 9):
        raise _explain_refusal(path, layout)
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
        layout = _kind(p)
        if layout is not None:
            return _read_safetensors(p, layout)
        return _state_dict(load_torch_file(p), p)


def read_header(path: PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)}. For safetensors only the header is read; a pickle has to be loaded
    (memory-mapped, so tensor data is still not read)."""
    p = _checked_path(path)
    with _reading(p):
        layout = _kind(p)
        if layout is not None:
            return {k: (e.shape, e.dtype) for k, e in layout.entries.items()}
        return {k: (tuple(t.shape), t.dtype) for k, t in _state_dict(load_torch_file(p), p).items()}


def read_metadata(path: PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} for pickles, which have none)."""
    p = _checked_path(path)
    with _reading(p):
        layout = _kind(p)
        return {} if layout is None else layout.metadata
