"""A content-addressed blob store: ``blobs/sha256/<hex>`` (as an OCI layout keeps them).

Writes go to a temporary file and are renamed into place only after the
digest is verified, so a blob file is always complete and correct.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from .. import digest as digests
from ..errors import DigestMismatch

CHUNK = 1 << 20


class ContentStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest.split(":", 1)[1]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def ingest(self, stream: BinaryIO, expected: str, size: int | None = None) -> Path:
        """Copy *stream* in, verifying its digest (and size when given)."""
        target = self.path(expected)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        sha = hashlib.sha256()
        count = 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".ingest-")
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = stream.read(CHUNK)
                    if not chunk:
                        break
                    sha.update(chunk)
                    count += len(chunk)
                    out.write(chunk)
            actual = "sha256:" + sha.hexdigest()
            if size is not None and count != size:
                raise DigestMismatch(f"blob {expected} has {count} bytes, expected {size} (truncated or corrupted)")
            if actual != expected:
                raise DigestMismatch(f"blob {expected} has digest {actual} (corrupted)")
            os.replace(tmp, target)
            return target
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def put_bytes(self, data: bytes) -> str:
        d = digests.sha256_digest(data)
        import io

        self.ingest(io.BytesIO(data), d, len(data))
        return d

    def prune(self, keep: set[str]) -> int:
        directory = self.root / "sha256"
        removed = 0
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return 0
        stale_before = time.time() - 24 * 3600
        for name in names:
            path = directory / name
            if name.startswith(".ingest-"):
                # A download in progress in another process; only old leftovers go.
                try:
                    if path.stat().st_mtime > stale_before:
                        continue
                except FileNotFoundError:
                    continue
            elif "sha256:" + name in keep:
                continue
            path.unlink(missing_ok=True)
            removed += 1
        return removed
