"""The zip archive torch.save writes, checked so that reading it can cost no more than the file holds.

torch.save stores every member uncompressed (ZIP_STORED) under one folder: `<prefix>/data.pkl`, the
storages as `<prefix>/data/<key>`, and a few small records. A zip can declare anything: deflated members
that inflate to gigabytes (a zip bomb), sizes and offsets past the end of the file, a second central
directory that one zip reader finds and another does not. So, before torch's own zip reader (miniz)
sees the file:

- the end record sits at the very end (no comment, nothing after it; a zip64 end record and locator,
  which torch always writes, exactly before it) and the central directory exactly before those, so
  Python's zipfile and miniz, which search for these records differently, find the same ones;
- every member is stored, unencrypted, with an ASCII name under the common prefix, named once, and lies
  wholly inside the file (its local header checked against the central directory);
- `data.pkl` is at most `MAX_PICKLE_BYTES` and is read with one bounded read;
- afterwards torch's reader is asked what it sees (records, offsets, sizes, the bytes of data.pkl) and
  must agree, so the pickle the scan checked is the pickle torch loads.

`check_storages` then holds the storages the pickle declares to the members that back them.
"""
from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass

from weights.errors import CheckpointError
from weights.pickle_limits import MAX_PICKLE_BYTES

_EOCD = struct.Struct("<4s4H2LH")  # signature, disk, cd disk, entries here, entries, cd size, cd offset, comment
_LOCATOR = struct.Struct("<4sLQL")  # signature, disk of zip64 end record, its offset, disks
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # signature, record size, versions, disk, cd disk, entries here, entries, cd size, cd offset
_LOCAL = struct.Struct("<4s5H3L2H")  # signature, version, flags, method, time, date, crc, sizes, name len, extra len
_DOS_DIRECTORY = 0x10  # the directory bit of a member's MS-DOS attributes
_SMALL_RECORD = 1 << 16  # the records torch reads whole (version, byteorder, serialization id...) are bytes long


@dataclass(frozen=True)
class TorchZip:
    prefix: str  # the archive's folder, without the slash
    members: dict[str, tuple[int, int]]  # name under the prefix -> (data offset, size)
    pickle: bytes  # data.pkl

    def storage_size(self, key: str) -> int | None:
        m = self.members.get(f"data/{key}")
        return None if m is None else m[1]


def _truncated(path: str) -> CheckpointError:
    # The central directory sits at the end of a zip, so a cut-short download loses it first.
    return CheckpointError("truncated file (zip central directory missing or damaged); download it again", path)


def _central_directory(f, size: int, path: str) -> tuple[int, int, int]:
    """(entries, offset, size) of the central directory, from end records that sit where torch puts them."""
    if size < _EOCD.size:
        raise _truncated(path)
    f.seek(size - _EOCD.size)
    sig, disk, cd_disk, here, entries, cd_size, cd_offset, comment = _EOCD.unpack(f.read(_EOCD.size))
    if sig != b"PK\x05\x06" or comment:
        raise _truncated(path)
    end = size - _EOCD.size  # where the central directory (or the zip64 records) must end
    if end >= _LOCATOR.size + _EOCD64.size:
        f.seek(end - _LOCATOR.size)
        lsig, ldisk, record_at, disks = _LOCATOR.unpack(f.read(_LOCATOR.size))
        if lsig == b"PK\x06\x07":
            record_at_expected = end - _LOCATOR.size - _EOCD64.size
            f.seek(record_at_expected)
            (sig64, record_size, _, _, disk64, cd_disk64, here64, entries64, cd_size64,
             cd_offset64) = _EOCD64.unpack(f.read(_EOCD64.size))
            if (sig64 != b"PK\x06\x06" or record_at != record_at_expected or record_size != _EOCD64.size - 12
                    or ldisk or disks != 1 or disk64 or cd_disk64 or here64 != entries64):
                raise CheckpointError("refusing to load: its zip64 end records are not where torch writes them "
                                      "(a crafted archive?)", path)
            for short, long in ((entries, entries64), (cd_size, cd_size64), (cd_offset, cd_offset64)):
                if short not in (long, 0xFFFF, 0xFFFFFFFF):
                    raise CheckpointError("refusing to load: its zip and zip64 end records disagree (a crafted "
                                          "archive?)", path)
            entries, cd_size, cd_offset, end = entries64, cd_size64, cd_offset64, record_at_expected
    if disk or cd_disk or here != entries:
        raise CheckpointError("refusing to load: a multi-part zip archive, which torch.save never writes", path)
    if cd_offset + cd_size != end:
        # Python's zipfile would shift every offset to make up the difference; miniz would not.
        raise CheckpointError("refusing to load: its zip central directory is not where its end record says "
                              "(data prepended or appended?)", path)
    return entries, cd_offset, cd_size


def open_torch_zip(path: str) -> TorchZip:
    """The checked archive; CheckpointError for anything torch.save would not have written."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        entries, cd_offset, _ = _central_directory(f, size, path)
        try:
            infos = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, UnicodeDecodeError, ValueError, EOFError, OSError, NotImplementedError):
            raise _truncated(path) from None
        if len(infos) != entries:
            raise _truncated(path)
        if not infos:
            raise CheckpointError("an empty zip archive, not a torch.save checkpoint", path)
        prefix = infos[0].filename.split("/", 1)[0]
        members: dict[str, tuple[int, int]] = {}
        for info in infos:
            name = info.filename
            if not name.isascii() or not name.startswith(prefix + "/"):
                raise CheckpointError(f"refusing to load: zip member {name[:80]!r} is not under the archive's "
                                      f"folder {prefix!r} (not written by torch.save)", path)
            short = name[len(prefix) + 1:]
            if short in members:
                raise CheckpointError(f"refusing to load: zip member {name[:80]!r} appears twice (a crafted "
                                      "archive?)", path)
            if info.external_attr & _DOS_DIRECTORY or (info.external_attr >> 16) & 0o170000 == 0o040000:
                # miniz takes such a member for a folder and extracts nothing into torch's buffer, which torch
                # then reads as the record (uninitialised memory); Python's zipfile reads the bytes
                raise CheckpointError(f"refusing to load: zip member {name[:80]!r} is marked as a folder (a "
                                      "crafted archive?)", path)
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise CheckpointError(f"refusing to load: zip member {name[:80]!r} is compressed or encrypted; "
                                      "torch.save stores members as they are (a zip bomb?)", path)
            if info.compress_size != info.file_size or info.header_offset + _LOCAL.size > cd_offset:
                raise _truncated(path)
            f.seek(info.header_offset)
            local = _LOCAL.unpack(f.read(_LOCAL.size))
            name_len, extra_len = local[9], local[10]
            if local[0] != b"PK\x03\x04" or local[3] != 0 or f.read(name_len) != name.encode("ascii"):
                raise CheckpointError(f"corrupt zip archive (the local header of {name[:80]!r} does not match "
                                      "its directory entry); download it again", path)
            data_at = info.header_offset + _LOCAL.size + name_len + extra_len
            if data_at + info.file_size > cd_offset:
                raise CheckpointError(f"truncated or corrupt file (zip member {name[:80]!r} runs past the end of "
                                      "the data); download it again", path)
            members[short] = (data_at, info.file_size)
        if "data.pkl" not in members:
            script = "constants.pkl" in members
            what = "a TorchScript archive" if script else "a zip archive"
            raise CheckpointError(f"{what} without data.pkl, not a torch.save checkpoint; pass the model's .ckpt "
                                  "or .safetensors file", path)
        if "constants.pkl" in members:
            raise CheckpointError("a TorchScript archive, not a torch.save checkpoint; pass the model's .ckpt or "
                                  ".safetensors file", path)
        at, n = members["data.pkl"]
        if n > MAX_PICKLE_BYTES:
            raise CheckpointError(f"refusing to load: its data.pkl takes {n:,} bytes, over the "
                                  f"{MAX_PICKLE_BYTES // 2**20} MB a checkpoint's pickle may take", path)
        f.seek(at)
        pickle = f.read(n)
    return TorchZip(prefix, members, pickle)


def agree_with_torch(z: TorchZip, path: str, storage_keys: list[str]) -> None:
    """torch's own zip reader must see the records, offsets and data.pkl checked here."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(path)
        records = set(reader.get_all_records())
        sized = hasattr(reader, "get_record_size")
        same = records == set(z.members) and reader.get_record_offset("data.pkl") == z.members["data.pkl"][0]
        if same and sized:
            same = all(reader.get_record_size(n) == s for n, (_, s) in z.members.items())
        if same:
            same = all(reader.get_record_offset(f"data/{k}") == z.members[f"data/{k}"][0] for k in storage_keys)
        if same and sized:
            same = reader.get_record("data.pkl") == z.pickle
        if same:  # the small records torch reads as they are: the same bytes as the file holds there
            with open(path, "rb") as f:
                for name, (at, size) in z.members.items():
                    if not name.startswith("data/") and name != "data.pkl" and size <= _SMALL_RECORD:
                        f.seek(at)
                        same = same and bytes(reader.get_record(name)) == f.read(size)
    except RuntimeError as e:
        raise CheckpointError(f"corrupt zip archive (torch's reader: {str(e).splitlines()[0][:200]}); download "
                              "it again", path) from None
    if not same:
        raise CheckpointError("refusing to load: torch's zip reader sees a different archive than the checks "
                              "did (a crafted archive?)", path)
