"""DIR/manifest.jsonl: one line per finished job, appended by the driver as each job lands.

    {"id": "00003", "files": ["00003/00000.png"], "sha256": ["9f2c..."], "images": 1, "seconds": 0.41,
     "worker": "host:1234"}
    {"id": "00007", "error": "...: no such file; download an official checkpoint ...", "worker": "host:1234"}

`files` are relative to DIR, `sha256` is one digest per file, in the same order. Each line is one
`write` on a file opened for appending, then fsync'ed: a killed driver leaves at most a torn last line,
which the next run cuts off (that job was not recorded, so it runs again). The last line of an id wins.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError

NAME = "manifest.jsonl"


class Manifest:
    def __init__(self, outdir):
        self.path = Path(outdir) / NAME
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) != len(data):  # a line torn by a kill: it recorded nothing, drop it
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
                os.fsync(f.fileno())
        for n, line in enumerate(whole.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.records[str(record["id"])] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{self.path} line {n}: is not a manifest record; move the file away to start "
                                 "over, or fix that line") from None

    def finished(self, retry_failed: bool = False) -> set[str]:
        """The ids a rerun skips: every recorded job, or with retry_failed only those that succeeded."""
        return {i for i, r in self.records.items() if not (retry_failed and "error" in r)}

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write: lines of concurrent appends never interleave
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[str(record["id"])] = record
