"""One kind of error for bad user input, and the CLI wrapper that reports it as one line."""

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input (a recipe, a checkpoint, a data set, an image): reported as one line, exit code 2."""


def cli_entry(main: Callable[..., object]) -> Callable[..., object]:
    """Wrap a CLI `main` so that a UserError prints `error: ...` on stderr and exits 2, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper
