"""User-facing errors: one clear line that names the thing and the fix.

Anything a user can cause (a bad path, a bad image, a bad param) raises
:class:`UserError`; the entry points turn it into a single message on stderr and a
non-zero exit code instead of a traceback. Programming errors still raise normally.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

#: Exit code for bad input (params, paths, data) as opposed to a failed check.
EXIT_USER_ERROR = 2
#: Exit code for a check that ran and failed (a validation rule, a gate).
EXIT_CHECK_FAILED = 1


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message."""

    exit_code = EXIT_USER_ERROR


class CheckFailed(UserError):
    """A check ran to completion and found problems (reports were written first)."""

    exit_code = EXIT_CHECK_FAILED


F = TypeVar("F", bound=Callable[..., object])


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (else its type's name), for one-line errors
    built around a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def exit_on_user_error(func: F) -> F:
    """Decorate an entry point so a :class:`UserError` ends the process cleanly."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)

    return wrapper  # type: ignore[return-value]
