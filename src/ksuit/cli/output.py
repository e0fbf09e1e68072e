"""What the command line prints: one console, untrusted names made safe for a terminal, and the
one error printer with its exit codes.

Exit codes: 0 all good; 1 a checkpoint is incomplete, corrupt or unsafe (or training failed); 2
the arguments are wrong (missing folder or file, not a run folder, a bad option). An error is
one line on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer
from rich.console import Console

from ksuit.storage import CorruptCheckpointError, UnsafeCheckpointError

MAX_VALUE_CHARS = 2000
EXIT_BAD_CHECKPOINT = 1
EXIT_USAGE = 2

# what a command raises that means "you named the wrong thing" rather than "the checkpoint is bad"
USAGE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def printable(text: object, limit: int = MAX_VALUE_CHARS) -> str:
    """`text` safe for a terminal: undecodable bytes and control characters escaped, cut to
    `limit` characters (names come from an untrusted folder)."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def console() -> Console:
    # wide when not a terminal, so names are never cut in pipes, logs and tests
    return Console(width=None if sys.stdout.isatty() else 240, highlight=False)


def first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def fail(message: str, code: int) -> typer.Exit:
    """Prints `error: <message>` on stderr (each line made printable); returns the Exit to raise."""
    lines = "\n".join(printable(line) for line in str(message).splitlines()) or "error"
    typer.echo(f"error: {lines}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def exit_on_errors() -> Iterator[None]:
    """Turns what a command raises into one line on stderr and its exit code: a bad checkpoint
    exits 1, a wrong argument (missing or wrong folder or file, a bad value) exits 2."""
    try:
        yield
    except (CorruptCheckpointError, UnsafeCheckpointError) as e:
        raise fail(first_line(e), EXIT_BAD_CHECKPOINT) from None
    except (*USAGE_ERRORS, ValueError, TypeError, ImportError) as e:
        raise fail(first_line(e), EXIT_USAGE) from None
    except OSError as e:  # e.g. StoreAccessError, StoreUnavailableError: the message names the URL
        raise fail(f"{e.filename or ''} {e.strerror or e}".strip(), EXIT_USAGE) from None
