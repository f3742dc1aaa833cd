"""In-flight operations, so a crash at any instant can be undone on the next open.

Before an operation creates or deletes driver state for a cache id it takes
an *intent*: a file ``intents/<cache id>`` that it keeps flock-ed until the
metadata says how things ended.  The kernel drops the lock when the process
dies, so an intent file that can be locked belongs to a dead process: its
cache id is repaired (driver state the metadata does not know is removed)
and the file deleted.

Why a lock file and not a pid: pids are reused; locks die with their owner.
The file is created under a temporary name, locked, then renamed into place,
so nobody ever sees an unlocked intent of a live process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_TMP = ".tmp-"
TMP_GRACE_SECONDS = 60


class Intents:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        tmp = self.dir / f"{_TMP}{key}-{secrets.token_hex(4)}"
        final = self.dir / key
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(tmp, final)
            try:
                yield
            finally:
                os.unlink(final)
        finally:
            os.close(fd)

    def _try_lock(self, name: str) -> int | None:
        """An fd holding the lock of a dead owner's intent, or None (live owner or gone)."""
        try:
            fd = os.open(self.dir / name, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        return fd

    def _old(self, name: str) -> bool:
        try:
            return time.time() - os.lstat(self.dir / name).st_mtime > TMP_GRACE_SECONDS
        except FileNotFoundError:
            return False

    def active(self) -> set[str]:
        """Keys whose owner is still running."""
        live = set()
        for name in os.listdir(self.dir):
            if name.startswith(_TMP):
                continue
            fd = self._try_lock(name)
            if fd is None:
                if (self.dir / name).exists():
                    live.add(name)
            else:
                os.close(fd)
        return live

    def stale(self) -> list[str]:
        """Keys of intents left by dead processes (nothing is changed)."""
        found = []
        for name in os.listdir(self.dir):
            if name.startswith(_TMP):
                continue
            fd = self._try_lock(name)
            if fd is not None:
                os.close(fd)
                found.append(name)
        return found

    def reap(self, repair: Callable[[str], None]) -> list[str]:
        """Repair and drop every intent left by a dead process; returns their keys."""
        reaped = []
        for name in os.listdir(self.dir):
            if name.startswith(_TMP) and not self._old(name):
                # Between its creation and its flock a live owner's temporary
                # file is unlocked for an instant: only old ones are leftovers.
                continue
            fd = self._try_lock(name)
            if fd is None:
                continue
            try:
                if not name.startswith(_TMP):
                    repair(name)
                    reaped.append(name)
                try:
                    os.unlink(self.dir / name)
                except FileNotFoundError:
                    pass
            finally:
                os.close(fd)
        return reaped
