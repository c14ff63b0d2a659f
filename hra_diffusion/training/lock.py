"""One run per output folder: a lock file holding the running trainer's process id and host.

A second run into a held folder stops before it touches anything, naming the running one. A lock whose
process is gone (a crash, a kill -9) on this host is taken over with a note, so nothing is ever stuck; a lock
from another host (a shared disk) cannot be checked from here and is respected until its file is removed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import OutputFolderError

__all__ = ["LOCK_NAME", "OutputLock", "lock_holder"]

LOCK_NAME = ".hra-diffusion.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def lock_holder(out: str | os.PathLike) -> dict | None:
    """The lock's record ({"pid", "host", "started", "command"}) when a live run holds ``out``, else None
    (no lock, or a stale one: its process is gone from this host, or its file is unreadable)."""
    path = Path(out) / LOCK_NAME
    try:
        doc = json.loads(path.read_text())
        pid, host = int(doc["pid"]), str(doc["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # half-written or foreign: treated as stale
    if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
        return None
    return doc


class OutputLock:
    """``with OutputLock(out):`` holds ``out`` for this process. Creates ``out`` if needed; on leaving, removes
    the lock, and ``out`` too when the run left nothing else there (a refused run writes nothing)."""

    def __init__(self, out: str | os.PathLike, command: str = "") -> None:
        self.out, self.command = Path(out), command
        self.path = self.out / LOCK_NAME
        self.created_dir = False
        self.stale_note: str | None = None

    def acquire(self) -> OutputLock:
        if self.out.exists() and not self.out.is_dir():
            raise OutputFolderError(f"output_dir {str(self.out)!r} is a file, not a folder; choose another --output_dir")
        self.created_dir = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": self.command}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock_holder(self.out)
                if holder is not None:
                    self._undo_dir()
                    raise OutputFolderError(
                        f"output_dir {str(self.out)!r} is in use by a running run (pid {holder['pid']} on "
                        f"{holder['host']}, since {holder.get('started', '?')}): wait for it to finish, or choose "
                        f"another --output_dir (if that run is gone, delete {str(self.path)!r})") from None
                self.stale_note = f"note: took over the lock {str(self.path)!r} of a run that is no longer running"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            return self
        raise OutputFolderError(f"could not lock output_dir {str(self.out)!r}: another run keeps taking it; "
                                "choose another --output_dir")

    def release(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            if int(doc.get("pid", -1)) == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self._undo_dir()

    def _undo_dir(self) -> None:
        if self.created_dir:
            try:
                self.out.rmdir()  # only when empty: whatever the run wrote stays
            except OSError:
                pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
