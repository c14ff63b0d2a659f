"""One error boundary for every entry point: expected errors print one line, bugs keep their traceback.

An *expected* error is one the user can fix (a bad flag or config, a missing or unreadable file, weights
that are not on this machine, a full disk): the boundary prints ``<prog>: error: <message>`` on one line
and exits with code 2, without a traceback. ``HRA_DIFFUSION_DEBUG=1`` (or ``--debug``) prints the
traceback too. Anything else (a bug) propagates unchanged, with its traceback. Ctrl-C exits with 130.

What counts as expected (:func:`is_expected`):
- a :class:`UserError` (a ``ValueError``), or any exception class with the marker ``hra_user_error = True``
  (for classes that must stay ``OSError`` / ``RuntimeError`` subclasses);
- a ``ValueError`` or ``OSError`` raised by this package's own code (its deliberate messages);
- an ``OSError`` of the file system anywhere: file not found, not a directory, exists, permission denied,
  no space left, read-only file system.

Use it in a script::

    from hra_diffusion.errors import error_boundary, pop_debug_flag

    if __name__ == "__main__":
        debug = pop_debug_flag(sys.argv)             # --debug, or $HRA_DIFFUSION_DEBUG=1
        with error_boundary("dreambooth_hra.py", debug=debug):
            main(parse_args())

or ``run_guarded(main, argv, prog="...")`` where the exit code must be returned rather than raised.
Library warnings meant for the user are :class:`HRAWarning`; inside a boundary they print as one line
``<prog>: warning: <message>``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DEBUG_ENV",
    "EXIT_USER_ERROR",
    "EXIT_INTERRUPTED",
    "UserError",
    "ImageFileError",
    "AdapterFileError",
    "OutputFolderError",
    "HRAWarning",
    "debug_enabled",
    "is_expected",
    "one_line",
    "error_boundary",
    "run_guarded",
    "add_debug_flag",
    "pop_debug_flag",
    "DataError",
    "MissingDataError",
]

DEBUG_ENV = "HRA_DIFFUSION_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
_PACKAGE_DIR = Path(__file__).resolve().parent
_FS_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.ENOSPC,
              errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FS_HINTS = {
    errno.ENOSPC: "free some disk space (or choose another output folder) and re-run the same command",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.EACCES: "check the folder's permissions (or choose another output folder)",
    errno.EPERM: "check the folder's permissions (or choose another output folder)",
}
_FS_HINTS[getattr(errno, "EDQUOT", errno.ENOSPC)] = _FS_HINTS[errno.ENOSPC]


class UserError(ValueError):
    """An error the user can fix; its message says what was wrong, which file or key, and what to do.

    Subclass it for a package's own error kinds (config, data, checkpoint, ...) so that every entry
    point's :func:`error_boundary` prints them as one line.
    """

    hra_user_error = True


class DataError(UserError):
    """Bad input data: a missing/empty folder, an unreadable image or row (the message names it)."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or folder that does not exist."""


class ImageFileError(DataError):
    """An image file that cannot be decoded (truncated, or not an image at all)."""


class AdapterFileError(UserError):
    """An adapter file that is not a readable safetensors file (truncated, or a pickle under that name)."""


class OutputFolderError(UserError, FileExistsError):
    """An output folder that cannot be written as asked (holds other work, or overlaps an input)."""


class HRAWarning(UserWarning):
    """Something the user should know about a result (e.g. images that were not scored)."""


def debug_enabled(flag: bool | None = None) -> bool:
    """``flag`` when given, else whether ``$HRA_DIFFUSION_DEBUG`` is set to something other than 0/false."""
    if flag:
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _raised_in_package(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def is_expected(err: BaseException) -> bool:
    """Whether ``err`` is a condition to report in one line (see the module docstring) rather than a bug."""
    if getattr(type(err), "hra_user_error", False):
        return True
    if isinstance(err, OSError) and err.errno in _FS_ERRNOS:
        return True
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)):
        return True
    return isinstance(err, (ValueError, OSError)) and _raised_in_package(err)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a file system error gets what to do)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__
    if isinstance(err, OSError) and err.errno in _FS_HINTS and "re-run" not in text:
        text += f"; {_FS_HINTS[err.errno]}"
    return text


def _show_warning(original: Callable, prog: str) -> Callable:
    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, HRAWarning):
            text = " ".join(str(message).split())
            print(f"{prog}: warning: {text}", file=file or sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    return show


def _report(err: BaseException, prog: str, debug: bool | None) -> int | None:
    """Print an expected error (or Ctrl-C) and return its exit code; None for anything else."""
    if isinstance(err, KeyboardInterrupt):
        if debug_enabled(debug):
            traceback.print_exception(err)
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not isinstance(err, Exception) or not is_expected(err):
        return None
    if debug_enabled(debug):
        traceback.print_exception(err)
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return EXIT_USER_ERROR


@contextlib.contextmanager
def _user_warnings(prog: str) -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("always", HRAWarning)
        warnings.showwarning = _show_warning(warnings.showwarning, prog)
        yield


@contextlib.contextmanager
def error_boundary(prog: str, debug: bool | None = None) -> Iterator[None]:
    """Run the block; an expected error prints ``<prog>: error: <one line>`` and raises SystemExit(2).

    ``debug`` (or ``$HRA_DIFFUSION_DEBUG``) prints the traceback before the line. Unexpected exceptions
    propagate with their traceback; Ctrl-C prints ``<prog>: interrupted`` and exits with 130.
    """
    with _user_warnings(prog):
        try:
            yield
        except (Exception, KeyboardInterrupt) as err:
            code = _report(err, prog, debug)
            if code is None:
                raise
            raise SystemExit(code) from None


def run_guarded(func: Callable[..., Any], *args: Any, prog: str, debug: bool | None = None, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` inside the boundary; returns its result, or the exit code (2, or 130 on
    Ctrl-C) after printing an expected error. Unexpected exceptions propagate with their traceback."""
    with _user_warnings(prog):
        try:
            return func(*args, **kwargs)
        except (Exception, KeyboardInterrupt) as err:
            code = _report(err, prog, debug)
            if code is None:
                raise
            return code


def add_debug_flag(parser, _top: bool = True) -> None:
    """Add ``--debug`` to an argparse parser and every (nested) subcommand parser of it."""
    import argparse

    parser.add_argument("--debug", action="store_true", default=False if _top else argparse.SUPPRESS,
                        help=f"on an error, show the full traceback (same as {DEBUG_ENV}=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                add_debug_flag(sub, _top=False)


def pop_debug_flag(argv: list[str]) -> bool:
    """Remove every ``--debug`` from ``argv`` in place; whether there was one (for entry points whose own
    parser does not know the flag, e.g. ``debug = pop_debug_flag(sys.argv)`` before parsing)."""
    found = "--debug" in argv
    argv[:] = [a for a in argv if a != "--debug"]
    return found
