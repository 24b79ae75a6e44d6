"""User errors: one line on stderr, a non-zero exit, never a bare traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the user's input (params, corpus, files). `str(e)` is the whole message."""

    exit_code = 2


class DataValidationError(UserError):
    """The data failed its Great Expectations suite; one line per failed expectation."""

    exit_code = 1


def run_main(main: Callable[[], object]) -> None:
    """Run a stage's `main()`, turning a UserError into its message and exit code."""
    try:
        main()
    except UserError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
