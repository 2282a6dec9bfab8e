"""A full disk: a run that cannot write for want of space stops in one line that says where, and how much it needs.

Every writer fails its own way when the disk fills: Python with OSError(ENOSPC), safetensors with "No space left on
device (os error 28)", `torch.save` with a RuntimeError about its stream's position. `disk_full_stops` turns any of
them into a RunError (exit 1). The atomic writers (utils.files) and the checkpoint's staging leave nothing
half-written, so the last complete checkpoint stays whole and the run folder can be copied elsewhere and resumed.
"""

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from vit_hf.training.checkpoint import latest_checkpoint
from vit_hf.utils.errors import RunError, UserError

_NO_SPACE = re.compile(r"No space left on device|os error 28|Disk quota exceeded|os error 122")
# What torch.save's zip writer says on a short write: no errno to go by, so the free space decides.
_SHORT_WRITE = re.compile(r"unexpected pos|iostream error|file write failed|PytorchStreamWriter")


def _size(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _bytes_of(folder: Path) -> int:
    """The space the files under FOLDER take, a file with several links (the best model's) once."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        stat = path.stat()
        if path.is_file() and (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_size
    return total


def _chain(error: BaseException) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _free(out: Path) -> int:
    folder = next((path for path in (out, *out.parents) if path.exists()), Path("/"))
    return shutil.disk_usage(folder).free


def _disk_full(error: Exception, out: Path, needed: int) -> bool:
    """Whether ERROR is a write that failed for want of space in OUT's file system."""
    if isinstance(error, (UserError, RunError)):
        return False
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _NO_SPACE.search(str(link)):
            return True
    short_write = any(_SHORT_WRITE.search(str(link)) for link in _chain(error))
    return short_write and _free(out) < max(needed, 1 << 20)


def _message(out: Path) -> str:
    free, latest = _free(out), latest_checkpoint(out / "checkpoints")
    if latest is None:
        need = f"{_size(free)} free there, and the run needs room for its first checkpoint (weights, optimizer state)"
        keep = "no checkpoint was written yet: free some space, or choose an output.dir on a larger disk"
    else:
        need = (
            f"{_size(free)} free there, and the run needs about {_size(_bytes_of(latest))} for each checkpoint (as "
            f"{latest.name})"
        )
        keep = (
            f"the last complete checkpoint, {latest}, is intact: free some space and continue with --resume auto, or "
            f"copy {out} to a larger disk and continue there with --resume auto --set output.dir=NEW_DIR"
        )
    return f"the disk is full: writing in {out} failed ({os.strerror(errno.ENOSPC)}); {need}; {keep}"


@contextlib.contextmanager
def disk_full_stops(out: Path) -> Iterator[None]:
    """Around a run whose output folder is OUT: a write that fails for want of space becomes a one-line RunError."""
    try:
        yield
    except Exception as error:
        latest = latest_checkpoint(out / "checkpoints")
        if not _disk_full(error, out, 0 if latest is None else _bytes_of(latest)):
            raise
        raise RunError(_message(out)) from None
