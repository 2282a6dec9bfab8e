"""The errors a user sees as one line, and the CLI wrapper that reports them."""

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input (a recipe, a checkpoint, a data set, an image): reported as one line, exit code 2."""

    exit_code = 2


class RunError(Exception):
    """A run that cannot go on (a NaN loss, say): reported as one line, exit code 1."""

    exit_code = 1


def cli_entry(main: Callable[..., object]) -> Callable[..., object]:
    """Wrap a CLI `main` so that a UserError or RunError prints `error: ...` on stderr, with no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, RunError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)

    return wrapper
