"""One run an output folder: the lock a run holds on `output.dir` while it lives, and the tidying it may then do.

The lock is an advisory `flock` on `output.dir/run.lock`, taken by the main process: the kernel releases it when the
process dies, however it dies, so a killed run never blocks its resume. The file also holds the holder's process id,
for the message of a run that finds the folder taken. (On a network file system without `flock`, nothing is locked.)
"""

import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vit_hf.utils.errors import UserError
from vit_hf.utils.files import clear_leftovers

if TYPE_CHECKING:  # this module is imported before torch, to refuse a folder in use at once (vit_hf.finetune)
    from accelerate import Accelerator

LOCK = "run.lock"
# A dead holder's forked children (data workers) share its lock until they notice it died: wait for them that long.
ORPHAN_WAIT_SECONDS = 10.0
_held: dict[Path, int] = {}  # folder -> the lock file's descriptor, for a second run in the same process
_created: set[Path] = set()  # the folders a lock made: a run that wrote nothing else leaves none behind


def main_decides(accelerator: "Accelerator", decide: Callable[[], object]) -> object:
    """DECIDE() on the main process, its answer (or its UserError) on every process: the others wait for it."""
    from accelerate.utils import broadcast_object_list

    verdict = [None, None]
    if accelerator.is_main_process:
        try:
            verdict = [decide(), None]
        except UserError as error:
            verdict = [None, str(error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict)
    if verdict[1] is not None:
        raise UserError(verdict[1])
    return verdict[0]


def _holder(path: Path) -> tuple[str, str]:
    """The process id and the machine that the lock file names."""
    words = path.read_text().split() if path.exists() else []
    return (words + ["unknown"])[0], (words[1:] + [socket.gethostname()])[0]


def _alive(pid: str, host: str) -> bool:
    """Whether process PID lives (one on another machine is taken to)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _lock(folder: Path) -> None:
    """Take FOLDER's lock for this process, or a one-line UserError naming the live holder."""
    if not folder.exists():
        _created.add(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + ORPHAN_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                return  # a file system without flock: run unlocked, as before
            pid, host = _holder(path)
            if _alive(pid, host) or time.monotonic() > deadline:
                os.close(fd)
                raise UserError(
                    f"output.dir {folder} is in use by another run (process {pid} on {host}): wait for it to end, "
                    "stop it, or choose another output.dir"
                ) from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _held[folder] = fd


def hold_run_folder(folder: Path) -> None:
    """Take FOLDER's lock now, in a process that will be the run's main one (a launcher's rank 0, or the only one):
    `vit_hf.finetune` does it before its imports that take seconds, so a folder in use is refused at once."""
    if int(os.environ.get("RANK", "0")) == 0:
        _hold(folder)


def _hold(folder: Path) -> None:
    """FOLDER's lock for this process, taken unless it holds it already (vit_hf.finetune took it early)."""
    if folder.resolve() not in _held:
        _lock(folder.resolve())


def claim_run_folder(accelerator: "Accelerator", folder: Path) -> None:
    """Hold FOLDER for this run (its main process takes the lock; every process gets the verdict), then remove what
    a killed run left half-written there: temporary files and a checkpoint's staging folder."""

    def claim() -> None:
        _hold(folder)
        clear_leftovers(folder)
        clear_leftovers(folder / "checkpoints")

    main_decides(accelerator, claim)


def release_run_folder(folder: Path) -> None:
    """Let FOLDER go before this process ends (a test's second run in the same process); where the run wrote nothing
    else (it stopped on bad input), its lock file goes too, and the folder if the lock made it."""
    folder = folder.resolve()
    fd = _held.pop(folder, None)
    if fd is None:
        return
    try:
        if [path.name for path in folder.iterdir()] == [LOCK]:
            (folder / LOCK).unlink()
            if folder in _created:
                folder.rmdir()
    finally:
        _created.discard(folder)
        os.close(fd)
