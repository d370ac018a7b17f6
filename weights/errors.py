"""The one error a user sees for a checkpoint that cannot be used."""
from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(Exception):
    """A checkpoint file (or its contents) that cannot be used.

    str() is a single line, `<file>: <what is wrong>; <what to do>`, because it ends up as the last
    line a command-line user reads; a traceback-shaped message would bury the advice.
    """

    def __init__(self, message: str, path: Optional[PathLike] = None):
        self.path = None if path is None else os.fspath(path)
        self.message = " ".join(str(message).split())  # one line, whatever the cause said
        super().__init__(self.message if self.path is None else f"{self.path}: {self.message}")
