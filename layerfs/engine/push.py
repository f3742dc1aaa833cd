"""Push an image to any transport, and commit a container as a new image.

Layer blobs come from the content store when the engine kept the original
(pulled from a registry, built by commit); otherwise the layer is exported
from the graph.  A re-exported layer whose bytes differ from the original
gets its new diff id written into the pushed config, so the pushed image
is always self-consistent (its rootfs is the same; its ids may differ).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import zstandard
from zlib_ng import gzip_ng

from .. import archive
from .. import digest as digests
from ..errors import InvalidOption
from . import oci
from .images import Image, ImageStore, normalize_name
from .pull import PullOptions
from .reference import ImageRef, parse
from .sources import ImageDestination

COMPRESSIONS = ("gzip", "zstd", "none")


def open_destination(ref: ImageRef, images: ImageStore, opts: PullOptions, repo_tag: str | None, chunked: bool) -> ImageDestination:
    tmp = images.store.root / "tmp"
    if ref.transport in ("oci", "oci-archive"):
        from .local import OCILayoutDestination

        return OCILayoutDestination(ref, tmp)
    if ref.transport == "docker-archive":
        from .local import DockerArchiveDestination

        return DockerArchiveDestination(ref, tmp, repo_tag)
    from .registry import RegistryDestination

    return RegistryDestination(ref, tls_verify=opts.tls_verify, creds=opts.creds, authfile=opts.authfile, chunked=chunked)


def compress_file(src_path: str, dst_dir: Path, compression: str) -> tuple[str, int, str]:
    """Compress an uncompressed or compressed tar blob into *compression*; returns (digest, size, path)."""
    fd, out_path = tempfile.mkstemp(prefix=".blob-", dir=dst_dir)
    with open(src_path, "rb") as raw, os.fdopen(fd, "wb") as out:
        stream, _ = archive.decompressed(raw)
        writer = _HashFile(out)
        if compression == "gzip":
            # zlib-ng: same format, about twice zlib's speed; one thread, so the
            # bytes (and the digest) do not depend on the machine's core count.
            with contextlib.closing(stream), gzip_ng.GzipFile(fileobj=writer, mode="wb", compresslevel=6, mtime=0) as z:
                shutil.copyfileobj(stream, z, 1 << 20)
        elif compression == "zstd":
            cctx = zstandard.ZstdCompressor(level=3, threads=-1)
            with contextlib.closing(stream), cctx.stream_writer(writer, closefd=False) as z:
                shutil.copyfileobj(stream, z, 1 << 20)
        else:
            with contextlib.closing(stream):
                shutil.copyfileobj(stream, writer, 1 << 20)
    return writer.digest(), writer.count, out_path


class _HashFile:
    def __init__(self, out):
        import hashlib

        self._out = out
        self._sha = hashlib.sha256()
        self.count = 0

    def write(self, data) -> int:
        self._sha.update(data)
        self._out.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self._out.flush()

    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()


def push(
    images: ImageStore,
    image_name: str,
    dest_text: str,
    *,
    compression: str = "gzip",
    opts: PullOptions | None = None,
    chunked: bool = False,
    progress=None,
) -> str:
    """Write image *image_name* to *dest_text*; returns the pushed manifest's digest."""
    if compression not in COMPRESSIONS:
        raise InvalidOption(f"--compress {compression!r}: use gzip, zstd or none")
    opts = opts or PullOptions()
    emit = progress or (lambda event: None)
    image = images.image(image_name)
    ref = parse(dest_text)
    manifest = image.manifest
    config = json.loads(image.config_raw)
    diff_ids = list(config["rootfs"]["diff_ids"])
    manifest_type = image.manifest_type
    if compression == "zstd" or ref.transport in ("oci", "oci-archive"):
        manifest_type = oci.OCI_MANIFEST  # zstd layers have no Docker media type
    if ref.transport == "docker-archive":
        manifest_type = oci.DOCKER_MANIFEST
    work = Path(tempfile.mkdtemp(prefix="push-", dir=images.store.root / "tmp"))
    try:
        layer_descs = []
        blob_paths: dict[str, str] = {}
        for i, (desc, chain_id) in enumerate(zip(manifest.layers, image.chain)):
            have = images.content.path(desc.digest) if images.content.has(desc.digest) else None
            kept_compression = oci.LAYER_COMPRESSION.get(desc.media_type, "gzip")
            if have is not None and kept_compression == compression:
                digest, size, path = desc.digest, desc.size, str(have)
            elif have is not None:
                digest, size, path = compress_file(str(have), work, compression)
            else:
                source, exported = _export_layer(images, chain_id, work)
                if exported != diff_ids[i]:
                    diff_ids[i] = exported  # re-exported bytes differ: the pushed config says so
                if compression == "none":
                    # The exported tar is the blob, and the export hashed it: no second pass.
                    digest, size, path = exported, os.path.getsize(source), source
                else:
                    digest, size, path = compress_file(source, work, compression)
            blob_paths[digest] = path
            layer_descs.append({"mediaType": oci.layer_media_type(manifest_type, compression), "size": size, "digest": digest})
            emit({"event": "layer", "digest": digest, "status": "prepared", "total": size})
        if diff_ids != config["rootfs"]["diff_ids"]:
            config["rootfs"]["diff_ids"] = diff_ids
            config_raw = oci.canonical_json(config)
        else:
            config_raw = image.config_raw
        config_digest = digests.sha256_digest(config_raw)
        config_path = work / "config.json"
        config_path.write_bytes(config_raw)
        blob_paths[config_digest] = str(config_path)
        config_type = oci.DOCKER_CONFIG if manifest_type == oci.DOCKER_MANIFEST else oci.OCI_CONFIG
        new_manifest = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "size": len(config_raw), "digest": config_digest},
            "layers": layer_descs,
        }
        manifest_raw = oci.canonical_json(new_manifest)
        with open_destination(ref, images, opts, image.name, chunked) as dest:
            for desc in layer_descs + [new_manifest["config"]]:
                if dest.has_blob(desc["digest"]):
                    emit({"event": "layer", "digest": desc["digest"], "status": "exists", "total": desc["size"]})
                    continue
                emit({"event": "layer", "digest": desc["digest"], "status": "uploading", "total": desc["size"]})
                dest.put_blob(desc["digest"], desc["size"], blob_paths[desc["digest"]])
                emit({"event": "layer", "digest": desc["digest"], "status": "done", "total": desc["size"]})
            dest.put_manifest(manifest_raw, manifest_type)
            dest.commit()
        digest = digests.sha256_digest(manifest_raw)
        emit({"event": "done", "manifest": digest, "destination": str(ref)})
        return digest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export_layer(images: ImageStore, chain_id: str, work: Path) -> tuple[str, str]:
    """The layer re-exported into a temporary tar under *work*: (path, its diff id)."""
    fd, path = tempfile.mkstemp(prefix=".layer-", suffix=".tar", dir=work)
    with os.fdopen(fd, "wb") as out:
        diff_id = images.store.export_layer(chain_id, out)  # the sha256 of the bytes written
    return path, diff_id


def commit_image(images: ImageStore, container: str, image_name: str, *, message: str = "", compression: str = "gzip") -> Image:
    """Commit *container*'s changes as a new layer and record image *image_name* on it.

    The new image's config is the config of the image the container was
    made from (the image whose top layer is the container's parent), with
    the new diff id and a history entry added; the layer's blob is kept in
    the content store so it can be pushed byte for byte.
    """
    store = images.store
    image_name = normalize_name(image_name)
    ctr = store.container(container)
    base = _base_image(images, ctr.parent)
    if base is not None:
        config = json.loads(base.config_raw)
        manifest_type = base.manifest_type
        layers = [d.to_json() for d in base.manifest.layers]
        chain = list(base.chain)
    else:
        if ctr.parent is not None:
            chain = _chain_of(store, ctr.parent)
            diff_ids = [store.layer(c).diff_id for c in chain]
        else:
            chain, diff_ids = [], []
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [],
        }
        manifest_type = oci.OCI_MANIFEST
        # Layers without kept blobs: described by their diff id; push re-exports them.
        layers = [{"mediaType": oci.OCI_LAYER, "size": 0, "digest": d} for d in diff_ids]
    work = Path(tempfile.mkdtemp(prefix="commit-", dir=store.root / "tmp"))
    try:
        tar_path = work / "layer.tar"
        with open(tar_path, "wb") as out:
            diff_id = store.export_diff(container, out)
        blob_digest, blob_size, blob_path = compress_file(str(tar_path), work, compression)
        with open(blob_path, "rb") as f:
            images.content.ingest(f, blob_digest, blob_size)
        layer = store.register(str(tar_path), parent=ctr.parent, expected_diff_id=diff_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    taken = [layer.chain_id]  # register gave the new layer its reference
    try:
        for chain_id in chain:
            store.retain(chain_id)
            taken.insert(len(taken) - 1, chain_id)
        chain.append(layer.chain_id)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        config = copy.deepcopy(config)
        config["created"] = now
        config.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"] = list(config["rootfs"].get("diff_ids", [])) + [diff_id]
        config.setdefault("history", []).append({"created": now, "created_by": f"layerfs commit {container}", "comment": message})
        config_raw = oci.canonical_json(config)
        images.content.put_bytes(config_raw)
        if manifest_type == oci.DOCKER_MANIFEST and compression == "zstd":
            manifest_type = oci.OCI_MANIFEST
        config_type = oci.DOCKER_CONFIG if manifest_type == oci.DOCKER_MANIFEST else oci.OCI_CONFIG
        layers.append({"mediaType": oci.layer_media_type(manifest_type, compression), "size": blob_size, "digest": blob_digest})
        manifest_raw = oci.canonical_json({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "size": len(config_raw), "digest": digests.sha256_digest(config_raw)},
            "layers": layers,
        })
        return images.add(image_name, manifest_raw, manifest_type, config_raw, chain)
    except BaseException:
        for chain_id in reversed(taken):
            store.release(chain_id)
        raise


def _base_image(images: ImageStore, parent: str | None) -> Image | None:
    if parent is None:
        return None
    for image in images.images():
        if image.top_chain == parent:
            return image
    return None


def _chain_of(store, chain_id: str) -> list[str]:
    out = []
    current: str | None = chain_id
    while current is not None:
        out.append(current)
        current = store.layer(current).parent
    return list(reversed(out))
