"""The one exception type for user mistakes, and the exit path that prints it."""

import sys


class UserError(Exception):
    """A mistake in the user's input: printed as one line, never with a traceback."""


def exit_with(err: BaseException, code: int = 2) -> None:
    """Prints `error: <message>` on standard error and exits with `code`."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
