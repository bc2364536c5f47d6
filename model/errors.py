"""The one error path for the user's mistakes, shared by the trainer and every tool.

A ``UserError`` is a mistake in what the user asked for (a path, a config value, an input file): the
CLI prints it as one line, ``error: <message>``, and exits with status 2, without a traceback. Its
message names the file, stream or sample and says what to do. Any other exception is our bug and
keeps its traceback.

This module lives in ``model/`` because it is the package every other one imports (data_pipeline,
training and tools all depend on it); it imports nothing heavy.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

EXIT_USER_ERROR = 2  # argparse's status for a bad command line, too


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2, no traceback."""


def cli(main: F) -> F:
    """Wrap a console script's ``main``: a ``UserError`` becomes ``error: <message>`` on stderr and
    ``SystemExit(2)``; everything else propagates unchanged."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper  # type: ignore[return-value]
