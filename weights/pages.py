"""Handing a memory-mapped checkpoint's pages back once their tensor has been copied elsewhere.

Converting a mapped float16 file to bfloat16 (or moving it to a GPU) touches every page of the file,
and touched pages of a mapping count in the process's resident memory until the mapping goes away;
with one mapping for the whole file that is the end of loading, so the peak would hold the file twice.
`PageReleaser(path)(tensor)` tells the kernel the pages behind a tensor that lives in a private
mapping of `path` are no longer needed (madvise MADV_DONTNEED: they stay in the page cache, and a
later read would fault them in again from the file). Tensors anywhere else are left alone: on
anonymous memory the same call would zero them. Linux only; elsewhere it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _file_mappings(path: str) -> list[tuple[int, int]]:
    """Address ranges of private (copy-on-write) mappings of `path` in this process."""
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[1][3] == "p" and parts[5].strip() == target:
                    start, end = (int(a, 16) for a in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


class PageReleaser:
    def __init__(self, path):
        self.ranges = _file_mappings(str(path)) if sys.platform.startswith("linux") else []
        self._madvise = ctypes.CDLL(None, use_errno=True).madvise if self.ranges else None

    def __call__(self, tensor: torch.Tensor) -> None:
        if not self.ranges or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        begin = storage.data_ptr()
        end = begin + storage.nbytes()
        if not any(lo <= begin and end <= hi for lo, hi in self.ranges):
            return
        # Whole pages inside the tensor only: a page it shares with a neighbour is kept.
        first = -(-begin // _PAGE) * _PAGE
        last = end // _PAGE * _PAGE
        if last > first:
            self._madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(_MADV_DONTNEED))
