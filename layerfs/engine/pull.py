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
5. The image is recorded, holding one reference on each of its layers.

Any failure leaves the store as it was.
"""

from __future__ import annotations

import hashlib
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
    moves it into the content store once the blob proved good).
    """

    def __init__(self, inner: BinaryIO, digest: str, size: int, keep: BinaryIO | None = None):
        self._inner = inner
        self._digest = digest
        self._size = size
        self._sha = hashlib.sha256()
        self._count = 0
        self._keep = keep
        self.verified = False

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        if data:
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
        actual = "sha256:" + self._sha.hexdigest()
        if actual != self._digest:
            raise DigestMismatch(f"blob {self._digest} has digest {actual} (corrupted)")
        self.verified = True

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
        if remote and first_missing < len(chain):
            trio.run(_download_all, images, source, [manifest.layers[i] for i in range(first_missing, len(chain))], emit)
        sources = []
        for i, desc in enumerate(manifest.layers):
            sources.append((_opener(images, source, desc, remote, emit), diff_ids[i]))
        layers = images.store.register_chain(sources, parallel=opts.parallel)
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


def _opener(images: ImageStore, source: ImageSource, desc: oci.Descriptor, remote: bool, emit: Progress):
    def open_layer() -> BinaryIO:
        emit({"event": "layer", "digest": desc.digest, "status": "applying", "total": desc.size})
        if remote:
            return VerifyingReader(open(images.content.path(desc.digest), "rb"), desc.digest, desc.size)
        return VerifyingReader(source.open_blob(desc.digest, desc.size), desc.digest, desc.size)

    return open_layer


async def _download_all(images: ImageStore, source: ImageSource, descs: list[oci.Descriptor], emit: Progress) -> None:
    limiter = trio.CapacityLimiter(MAX_PARALLEL_DOWNLOADS)
    async with trio.open_nursery() as nursery:
        for desc in descs:
            if images.content.has(desc.digest):
                emit({"event": "layer", "digest": desc.digest, "status": "downloaded", "total": desc.size})
                continue
            nursery.start_soon(_download_one, images, source, desc, emit, limiter)


async def _download_one(images, source, desc, emit, limiter) -> None:
    def work() -> None:
        emit({"event": "layer", "digest": desc.digest, "status": "downloading", "total": desc.size})
        with source.open_blob(desc.digest, desc.size) as f:
            images.content.ingest(_Counting(f, desc, emit), desc.digest, desc.size)
        emit({"event": "layer", "digest": desc.digest, "status": "downloaded", "total": desc.size})

    await trio.to_thread.run_sync(work, limiter=limiter)


class _Counting(ReadStream):
    def __init__(self, inner, desc, emit):
        self._inner, self._desc, self._emit, self._done, self._last = inner, desc, emit, 0, 0

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self._done += len(data)
        if self._done - self._last >= (4 << 20) or not data:
            self._last = self._done
            self._emit({"event": "layer", "digest": self._desc.digest, "status": "downloading", "bytes": self._done, "total": self._desc.size})
        return data
