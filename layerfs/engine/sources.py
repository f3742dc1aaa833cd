"""Where images come from and go to: one small interface per direction.

An :class:`ImageSource` gives a manifest (an index is resolved to one
platform by the caller) and blobs by digest; an :class:`ImageDestination`
takes blobs and a manifest.  Transports implement both: OCI layout
directories and archives and docker-archive here, registries in
``registry.py``.
"""

from __future__ import annotations

import abc
from typing import BinaryIO


class ImageSource(abc.ABC):
    @abc.abstractmethod
    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        """The raw manifest (or index) bytes and media type; digest None is the reference's own."""

    @abc.abstractmethod
    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        """A stream of the blob's raw bytes. Callers verify the digest while reading."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ImageDestination(abc.ABC):
    @abc.abstractmethod
    def has_blob(self, digest: str) -> bool: ...

    @abc.abstractmethod
    def put_blob(self, digest: str, size: int, path: str) -> None:
        """Store the blob at *path* (already verified) under *digest*."""

    @abc.abstractmethod
    def put_manifest(self, raw: bytes, media_type: str) -> None:
        """Store the manifest and point the destination's reference at it."""

    def commit(self) -> None:
        """Finish (archives are written here)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
