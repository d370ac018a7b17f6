"""What the commands do with an error a user can fix: one line on stderr, exit code 2; Ctrl-C exits 130.

Every command (`inspect`, `txt2img`, `img2img`, `steps`) runs through `run_command`, so the three kinds
of failure look the same everywhere. Nothing here imports a command: the commands import this.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

from models.config import ConfigError
from weights import CheckpointError

from .device import DeviceError
from .images import ImageError
from .pipeline import NonFiniteError

USER_ERROR = 2    # a flag, an input file or a checkpoint the user can fix
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class UsageError(ValueError):
    """A flag or input the user can fix; the message is one line and says what to do."""


# The project's own errors for what a user can fix, and OSError for files that cannot be read or written.
# Not every ValueError: a bug that raises one keeps its traceback instead of passing for a user's mistake.
USER_ERRORS = (UsageError, CheckpointError, ConfigError, DeviceError, ImageError, NonFiniteError, OSError)


def one_line(e: BaseException) -> str:
    """The error's message on one line; an OSError as `path: reason` without its errno."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a `kill`, a job scheduler) ends the run as Ctrl-C does: files cleaned up


def run_command(command: Callable[[], int]) -> int:
    """Call `command` and return its exit code; a user error is printed as `error: <one line>` (exit 2).
    While it runs, SIGTERM is taken as Ctrl-C (exit 130), so no half-written output stays behind."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return command()
    except SystemExit as e:  # argparse's --help (and its usage errors, for parsers that do not raise UsageError)
        return e.code if isinstance(e.code, int) else 0
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        return INTERRUPTED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
