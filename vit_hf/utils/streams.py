"""A closed stdout or stderr never stops a run.

`... 2>&1 | tee train.log` and Ctrl-C: the terminal signals tee too, tee exits, and the next progress-bar write
fails with a broken pipe. The run must still save its checkpoint and exit 130, so a write to a closed stream is
dropped, and so is everything written to that stream after it.
"""

import errno
import os
import sys
from typing import TextIO


class _PipeSafe:
    """A text stream whose writes and flushes survive the reader's exit: on the first broken pipe the stream's file
    descriptor is pointed at /dev/null, so that every other writer holding it (a logging handler, say) goes quiet too
    instead of raising."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            self._drop(error)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            self._drop(error)

    def _drop(self, error: OSError) -> None:
        if error.errno not in (errno.EPIPE, errno.EINVAL):  # EINVAL: Windows' broken pipe
            raise error
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_closed_output() -> None:
    """Make sys.stdout and sys.stderr drop what they cannot write once their reader is gone."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _PipeSafe):
            setattr(sys, name, _PipeSafe(stream))
