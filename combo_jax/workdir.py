"""A training run's folder: who holds it, and how files in it are written.

* :class:`WorkdirLock`: one training run per workdir. The lock is a file ``WORKDIR/.lock`` created with
  ``O_EXCL`` and holding the owner's host, pid and process start time. A lock whose owner is a dead process on
  this host (``kill -9``, a crash, a reboot) is stale and taken over (by one of several racing runs only);
  any other is an error naming the owner.
* :func:`write_text_atomic` / :func:`write_bytes_atomic`: a reader sees the old file or the complete new one,
  never half of it; the new file is a fresh inode created with ``O_EXCL`` under a random name and renamed over
  the target, so a symbolic link planted at the target (or at a guessable temporary name) is replaced, never
  followed.
* :func:`check_writable`: whether a workdir can be created and written, without creating it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time

LOCK_NAME = ".lock"


class WorkdirError(RuntimeError):
    """A workdir that cannot be used: held by another run, or not writable."""


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a fresh temporary file in the same folder and ``os.replace``."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)  # O_EXCL: never follows a link
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # replaces a link at `path` itself, never its target
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` so that a concurrent reader sees the old file or the complete new one."""
    write_bytes_atomic(path, text.encode())


def check_writable(workdir: str) -> None:
    """Raises :class:`WorkdirError` unless ``workdir`` is (or can be created as) a writable folder.

    Creates nothing: the nearest existing ancestor must be a writable folder.
    """
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"workdir {workdir!r} is not writable: it exists and is not a folder")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise WorkdirError(f"workdir {workdir!r} is not writable: {probe!r} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir!r} is not writable: no write permission on {probe!r}")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a pid reused after a crash."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _start_time(pid)
    return start is None or now is None or now == start


def _describe(owner: dict) -> str:
    since = owner.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (since {when})"


class WorkdirLock:
    """Exclusive use of a workdir by one run (one process: process 0 of a multi-process job takes it).

    ``acquire()`` creates the workdir if needed and the lock file; ``release()`` removes the lock if it is still
    ours. A lock left by a dead process of this host is taken over, with a note; a lock of a live process, or of
    another host (whose processes cannot be checked from here), raises :class:`WorkdirError` naming the owner
    and how to clear it.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
                      "since": time.time()}
        self.held = False
        self.took_over: dict | None = None  # the stale owner we replaced, if any

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated below by its age

    def acquire(self) -> "WorkdirLock":
        os.makedirs(self.workdir, exist_ok=True)
        if os.path.islink(self.path):
            raise WorkdirError(f"workdir {self.workdir!r}: {self.path} is a symbolic link; remove it")
        for _ in range(5):
            if self._create():
                self.held = True
                return self
            owner = self._read()
            if owner is None:
                continue  # released meanwhile
            stale = self._stale(owner)
            if not stale:
                raise WorkdirError(
                    f"workdir {self.workdir!r} is in use by another run: {_describe(owner)}. Stop that run, or use "
                    f"another workdir; if that process is gone, remove {self.path}"
                )
            if self._remove_if_stale():
                self.took_over = owner
        raise WorkdirError(f"workdir {self.workdir!r}: could not take the lock {self.path}; another run keeps "
                           "taking it")

    def _remove_if_stale(self) -> bool:
        """Removes the lock file if, read again under the takeover guard, it is still stale.

        Two runs may both read the same stale lock; the guard (an ``flock`` on ``.lock.takeover``, which the
        kernel releases when its holder dies) lets only one of them re-read and remove it at a time, so the
        second finds the first's fresh lock and is refused, never removing a live lock.
        """
        guard_path = self.path + ".takeover"
        try:
            guard = os.open(guard_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:  # a symbolic link planted there (never followed), or no permission
            raise WorkdirError(f"workdir {self.workdir!r}: cannot open {guard_path} to take over a stale lock "
                               f"({err.strerror}); remove it") from None
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            owner = self._read()
            if owner is None or not self._stale(owner):
                return False
            os.unlink(self.path)
            return True
        finally:
            os.close(guard)  # releases the flock

    def _stale(self, owner: dict) -> bool:
        if not owner:  # a lock file without an owner: a crash between create and write
            try:
                return time.time() - os.path.getmtime(self.path) > 10
            except OSError:
                return False
        if owner.get("host") != self.owner["host"] or not isinstance(owner.get("pid"), int):
            return False
        return not _alive(owner["pid"], owner.get("start"))

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self._read()
        if owner and owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
