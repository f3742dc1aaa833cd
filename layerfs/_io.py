"""Small stream building blocks shared by the tar, blob and archive readers."""

from __future__ import annotations

import io


class ReadStream(io.RawIOBase):
    """A readable raw stream whose subclasses only implement ``read(n)``."""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)
