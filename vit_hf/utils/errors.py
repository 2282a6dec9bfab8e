"""The errors a user sees as one line, and the CLI wrapper that reports them."""

import functools
import os
import sys
import time
import traceback
from collections.abc import Callable

from vit_hf.utils.streams import survive_closed_output


class UserError(Exception):
    """Bad input (a recipe, a checkpoint, a data set, an image): reported as one line, exit code 2."""

    exit_code = 2


class RunError(Exception):
    """A run that cannot go on (a NaN loss, say): reported as one line, exit code 1."""

    exit_code = 1


# How long a process other than the main one waits before it reports an error itself (see `cli_entry`).
OTHER_PROCESSES_WAIT_SECONDS = 10.0


def cli_entry(main: Callable[..., object]) -> Callable[..., object]:
    """Wrap a CLI `main` so that a UserError or RunError prints `error: ...` on stderr, with no traceback.

    In a job of several processes, bad input usually stops all of them with the same error: the main process (rank
    0) reports it at once, and the others wait, silent, for the launcher to end them when the main process exits. A
    process still running after `OTHER_PROCESSES_WAIT_SECONDS` met an error of its own (a broken image in its part of
    the data, say) and reports it, naming its rank.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        survive_closed_output()  # a log piped to `tee` that exits at Ctrl-C must not stop the save
        try:
            return main(*args, **kwargs)
        except (UserError, RunError) as error:
            rank = int(os.environ.get("RANK", "0"))
            if rank == 0 or int(os.environ.get("WORLD_SIZE", "1")) == 1:
                sys.stderr.write(f"error: {error}\n")  # one write: other processes print beside it
            else:
                time.sleep(OTHER_PROCESSES_WAIT_SECONDS)
                sys.stderr.write(f"error (process {rank}): {error}\n")
            sys.exit(error.exit_code)
        except Exception as error:
            waited_in = _collective_of(error)
            if waited_in is None or int(os.environ.get("WORLD_SIZE", "1")) == 1:
                raise
            # This process was waiting for the others in a collective when one of them exited: that one has said why.
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: another process of this job stopped while this one waited for it ({waited_in})",
                      file=sys.stderr)  # fmt: skip
            sys.exit(1)

    return wrapper


def _collective_of(error: Exception) -> str | None:
    """The torch.distributed function a RuntimeError was raised in (a peer lost in a collective), or None."""
    frames = traceback.extract_tb(error.__traceback__)
    if not isinstance(error, RuntimeError) or not frames or "torch/distributed/" not in frames[-1].filename:
        return None
    outer = next(f for f in frames if "torch/distributed/" in f.filename and "c10d_logger" not in f.filename)
    return f"torch.distributed {outer.name}"
