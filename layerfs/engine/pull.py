"""Pull: an image reference in, an image in the store out.

1. Resolve the manifest (an index is narrowed to one platform) and the
   config; verify both digests.
2. Work out the chain ids from the config's diff ids; layers already in the
   store are neither downloaded nor applied again.
3. Registry blobs are downloaded in parallel (trio, worker threads) into the
   content store, each verified; local blobs are streamed straight from the
   layout or archive.
4. The missing layers are applied (in parallel where the driver allows it)
   and published in one step by ``LayerStore.register_chain``; every blob's
   digest and every layer's diff id is checked before anything is visible.
   A registry layer is applied while it downloads: its reader follows the
   file the download is writing and sees the end only once the whole blob
   proved good, so apply time and download time overlap.
5. The image is recorded, holding one reference on each of its layers.

Any failure leaves the store as it was.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable

import trio

from .. import digest as digests
from ..errors import DigestMismatch, InvalidLayer, LayerfsError
from . import oci
from .images import Image, ImageStore, normalize_name
from .reference import ImageRef, parse
from .sources import ImageSource
from .._io import ReadStream

Progress = Callable[[dict], None]
MAX_PARALLEL_DOWNLOADS = 4
DOWNLOAD_SETTLE_SECONDS = 30.0  # after a failed apply, how long the downloads may run on to name a bad blob


@dataclass
class PullOptions:
    platform: str = "linux/amd64"
    creds: str | None = None
    authfile: str | None = None
    tls_verify: bool = True
    parallel: bool = True


def open_source(ref: ImageRef, opts: PullOptions) -> ImageSource:
    if ref.transport in ("oci", "oci-archive"):
        from .local import OCILayoutSource

        return OCILayoutSource(ref)
    if ref.transport == "docker-archive":
        from .local import DockerArchiveSource

        return DockerArchiveSource(ref)
    from .registry import RegistrySource

    return RegistrySource(ref, tls_verify=opts.tls_verify, creds=opts.creds, authfile=opts.authfile)


class VerifyingReader(ReadStream):
    """Reads a blob while checking its size and digest; raises DigestMismatch at the end.

    With *keep*, the raw bytes are also written to that file (the caller
    moves it into the content store once the blob proved good).  With
    ``hashing=False`` only the size is checked: for a blob whose digest is
    the layer's diff id, which register_chain checks anyway.
    """

    def __init__(self, inner: BinaryIO, digest: str, size: int, keep: BinaryIO | None = None, hashing: bool = True):
        self._inner = inner
        self._digest = digest
        self._size = size
        self._sha = hashlib.sha256() if hashing else None
        self._count = 0
        self._keep = keep
        self.verified = False

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        if data:
            if self._sha is not None:
                self._sha.update(data)
            self._count += len(data)
            if self._count > self._size:
                raise DigestMismatch(f"blob {self._digest} is longer than its {self._size} bytes (corrupted)")
            if self._keep is not None:
                self._keep.write(data)
        elif not self.verified and n != 0:
            self._verify()
        return data

    def _verify(self) -> None:
        if self._count != self._size:
            raise DigestMismatch(f"blob {self._digest} ended after {self._count} of {self._size} bytes (truncated)")
        if self._sha is not None:
            actual = "sha256:" + self._sha.hexdigest()
            if actual != self._digest:
                raise DigestMismatch(f"blob {self._digest} has digest {actual} (corrupted)")
        self.verified = True  # without hashing: the size; the caller checks the digest

    def close(self) -> None:
        self._inner.close()
        super().close()


def _read_verified(source: ImageSource, desc: oci.Descriptor, what: str, limit: int = 16 << 20) -> bytes:
    """A small blob (a config) read whole and verified."""
    if desc.size > limit:
        raise InvalidLayer(f"{what} {desc.digest} claims {desc.size} bytes; refusing more than {limit}")
    chunks = []
    with source.open_blob(desc.digest, desc.size) as f:
        reader = VerifyingReader(f, desc.digest, desc.size)
        while chunk := reader.read(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def resolve(source: ImageSource, ref: ImageRef, platform: str) -> tuple[bytes, str, oci.Manifest]:
    raw, media_type = source.get_manifest()
    parsed = oci.parse_manifest(raw, media_type)
    if ref.digest and digests.sha256_digest(raw) != ref.digest:
        raise DigestMismatch(f"{ref}: the registry sent a manifest with digest {digests.sha256_digest(raw)}")
    if isinstance(parsed, oci.Index):
        desc = oci.select_platform(parsed, platform)
        raw, media_type = source.get_manifest(desc.digest)
        if digests.sha256_digest(raw) != desc.digest:
            raise DigestMismatch(f"{ref}: manifest {desc.digest} does not match its digest")
        parsed = oci.parse_manifest(raw, media_type or desc.media_type)
        if not isinstance(parsed, oci.Manifest):
            raise InvalidLayer(f"{ref}: the index entry {desc.digest} is not an image manifest")
        media_type = media_type or desc.media_type
    for layer in parsed.layers:
        if layer.media_type and layer.media_type not in oci.LAYER_COMPRESSION:
            raise InvalidLayer(f"{ref}: layer {layer.digest} has unsupported media type {layer.media_type!r}")
    return raw, media_type or parsed.media_type, parsed


def pull(
    images: ImageStore,
    source_text: str,
    name: str | None = None,
    opts: PullOptions | None = None,
    progress: Progress | None = None,
) -> Image:
    """Pull *source_text* (a transport reference) into the store as image *name*."""
    opts = opts or PullOptions()
    ref = parse(source_text)
    emit = progress or (lambda event: None)
    with open_source(ref, opts) as source:
        manifest_raw, manifest_type, manifest = resolve(source, ref, opts.platform)
        config_raw = _read_verified(source, manifest.config, "config")
        config = oci.parse_config(config_raw, manifest.config.digest)
        diff_ids = config.diff_ids
        if len(diff_ids) != len(manifest.layers):
            raise InvalidLayer(
                f"{ref}: manifest {digests.sha256_digest(manifest_raw)} has {len(manifest.layers)} layers "
                f"but its config lists {len(diff_ids)} diff ids"
            )
        if name is None:
            repo_tag = getattr(source, "repo_tag", None)
            name = repo_tag or ref.short_name
        name = normalize_name(name)
        chain = digests.chain_ids(diff_ids)
        missing = [i for i, c in enumerate(chain) if not _has_layer(images, c)]
        first_missing = missing[0] if missing else len(chain)
        emit({"event": "resolved", "ref": str(ref), "manifest": digests.sha256_digest(manifest_raw), "layers": len(chain)})
        for i in range(first_missing):
            emit({"event": "layer", "digest": manifest.layers[i].digest, "status": "exists", "total": manifest.layers[i].size})
        remote = ref.transport == "docker"
        downloads: dict[str, _Download] = {}
        if remote:
            for desc in manifest.layers[first_missing:]:
                if desc.digest not in downloads and not images.content.has(desc.digest):
                    downloads[desc.digest] = _Download(images.content, desc)
        try:
            sources = []
            for i, desc in enumerate(manifest.layers):
                sources.append((_opener(images, source, desc, downloads, emit, diff_ids[i]), diff_ids[i]))
            if downloads:
                layers = trio.run(_download_and_register, images, source, sources, downloads, opts.parallel, emit)
            else:
                layers = images.store.register_chain(sources, parallel=opts.parallel)
        finally:
            for download in downloads.values():
                download.discard()
        for i in range(first_missing, len(chain)):
            emit({"event": "layer", "digest": manifest.layers[i].digest, "status": "done", "total": manifest.layers[i].size})
        try:
            if remote:
                images.content.put_bytes(config_raw)
                images.content.put_bytes(manifest_raw)
            image = images.add(name, manifest_raw, manifest_type, config_raw, [l.chain_id for l in layers])
        except BaseException:
            for layer in reversed(layers):
                images.store.release(layer.chain_id)
            raise
    emit({"event": "done", "image": image.name, "id": image.id})
    return image


def _has_layer(images: ImageStore, chain_id: str) -> bool:
    try:
        images.store.layer(chain_id)
        return True
    except LayerfsError:
        return False


def _opener(images: ImageStore, source: ImageSource, desc: oci.Descriptor, downloads: dict, emit: Progress, diff_id: str):
    # An uncompressed blob whose digest is the diff id (every docker-archive
    # layer) is verified by register_chain's diff id check: hash it once.
    same_hash = desc.digest == diff_id and oci.LAYER_COMPRESSION.get(desc.media_type, "none") == "none"

    def open_layer() -> BinaryIO:
        emit({"event": "layer", "digest": desc.digest, "status": "applying", "total": desc.size})
        download = downloads.get(desc.digest)
        if download is not None:
            return download.follow()
        if images.content.has(desc.digest):
            raw = open(images.content.path(desc.digest), "rb")
        else:
            raw = source.open_blob(desc.digest, desc.size)
        return VerifyingReader(raw, desc.digest, desc.size, hashing=not same_hash)

    open_layer.size_hint = desc.size  # register_chain gives big layers a process of their own
    return open_layer


async def _download_and_register(images: ImageStore, source: ImageSource, sources, downloads: dict, parallel: bool, emit: Progress):
    """Download the blobs (in parallel) while register_chain applies them as they arrive."""
    limiter = trio.CapacityLimiter(MAX_PARALLEL_DOWNLOADS)
    result: list = []
    failure: list[Exception] = []

    async def register() -> None:
        try:
            result.extend(await trio.to_thread.run_sync(lambda: images.store.register_chain(sources, parallel=parallel)))
        except Exception as exc:
            # Why not let it propagate: the nursery would wrap it in an
            # ExceptionGroup, and the caller wants the one-line LayerfsError.
            failure.append(exc)
            # A bad blob can break the tar or gzip stream before its own
            # digest check ends: let the downloads end (bounded), and report
            # the blob's error, which names its digest, rather than the symptom.
            await trio.to_thread.run_sync(_wait_all, list(downloads.values()), DOWNLOAD_SETTLE_SECONDS)
            blob_errors = [d.error for d in downloads.values() if isinstance(d.error, LayerfsError)]
            if blob_errors and (isinstance(exc, InvalidLayer) or not isinstance(exc, LayerfsError)):
                failure[0] = blob_errors[0]
        finally:
            for download in downloads.values():
                download.cancel()  # a failed apply stops the downloads still running

    async with trio.open_nursery() as nursery:
        for download in downloads.values():
            # A download never raises: its error reaches the apply that reads it.
            nursery.start_soon(lambda d: trio.to_thread.run_sync(d.run, source, emit, limiter=limiter), download)
        nursery.start_soon(register)
    if failure:
        raise failure[0]
    return result


class _Cancelled(Exception):
    pass


def _wait_all(downloads: list, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for download in downloads:
        download.wait_ended(max(0.0, deadline - time.monotonic()))


class _Download:
    """One registry blob written into the content store, readable while it grows.

    The blob goes to a temporary file next to its final place; readers made
    by :meth:`follow` read that file up to what has been written and get the
    end of the stream only after the whole blob was verified (or the
    download's error).  The verified file is renamed into the content store.
    """

    def __init__(self, content, desc: oci.Descriptor):
        self.desc = desc
        self.final = content.path(desc.digest)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.final.parent, prefix=".ingest-")
        os.close(fd)
        self._cond = threading.Condition()
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self._cancelled = False

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def run(self, source: ImageSource, emit: Progress) -> None:
        digest, size = self.desc.digest, self.desc.size
        emit({"event": "layer", "digest": digest, "status": "downloading", "total": size})
        try:
            sha = hashlib.sha256()
            last = 0
            with open(self.tmp, "wb") as out, source.open_blob(digest, size) as blob:
                while chunk := blob.read(1 << 20):
                    if self._cancelled:
                        raise _Cancelled()
                    sha.update(chunk)
                    out.write(chunk)
                    out.flush()  # readers use their own descriptor
                    with self._cond:
                        self.written += len(chunk)
                        if self.written > size:
                            raise DigestMismatch(f"blob {digest} is longer than its {size} bytes (corrupted)")
                        self._cond.notify_all()
                    if self.written - last >= (4 << 20):
                        last = self.written
                        emit({"event": "layer", "digest": digest, "status": "downloading", "bytes": self.written, "total": size})
            if self.written != size:
                raise DigestMismatch(f"blob {digest} ended after {self.written} of {size} bytes (truncated)")
            actual = "sha256:" + sha.hexdigest()
            if actual != digest:
                raise DigestMismatch(f"blob {digest} has digest {actual} (corrupted)")
            with self._cond:
                os.replace(self.tmp, self.final)
                self.done = True
                self._cond.notify_all()
            emit({"event": "layer", "digest": digest, "status": "downloaded", "total": size})
        except _Cancelled:
            pass
        except BaseException as exc:  # handed to the reader; see _download_and_register
            with self._cond:
                self.error = exc
                self._cond.notify_all()

    def wait_ended(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.done or self.error is not None or self._cancelled, timeout)

    def follow(self) -> BinaryIO:
        with self._cond:
            return _Follower(self, os.open(self.final if self.done else self.tmp, os.O_RDONLY | os.O_CLOEXEC))

    def wait_for(self, pos: int) -> int:
        """Bytes readable from *pos* on: > 0, or 0 at the verified end; raises the download's error."""
        with self._cond:
            while pos >= self.written and not self.done and self.error is None and not self._cancelled:
                self._cond.wait()
            if self.error is not None:
                raise self.error
            if self._cancelled and not self.done and pos >= self.written:
                raise LayerfsError(f"download of blob {self.desc.digest} was cancelled")
            return self.written - pos

    def discard(self) -> None:
        """Remove the temporary file unless the blob made it into the store."""
        if not self.done:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


class _Follower(ReadStream):
    def __init__(self, download: _Download, fd: int):
        self._download = download
        self._fd = fd
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        available = self._download.wait_for(self._pos)
        if available == 0:
            return b""
        want = available if n is None or n < 0 else min(n, available)
        data = os.pread(self._fd, want, self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()
