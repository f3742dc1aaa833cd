"""Local transports: OCI image layouts (directory or tar) and docker-archive.

Archives are read in place, never unpacked: a blob is a byte range of the
archive file, opened with its own file handle so layers can be read in
parallel.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from .. import archive
from .. import digest as digests
from ..errors import InvalidLayer, InvalidOption, NotFound
from . import oci
from .reference import ImageRef
from .sources import ImageDestination, ImageSource
from .._io import ReadStream

REF_NAME = "org.opencontainers.image.ref.name"


class _Range(ReadStream):
    """A read-only window [offset, offset + size) of a file, on its own handle."""

    def __init__(self, path: str, offset: int, size: int):
        self._f = open(path, "rb")
        self._f.seek(offset)
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()
        super().close()


class _ArchiveIndex:
    """Member name -> (data offset, size) of a tar file, read once."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.members: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(self.path, "r:") as tf:
                for m in tf:
                    if m.isreg():
                        self.members[_norm(m.name)] = (m.offset_data, m.size)
                    elif m.islnk():
                        target = self.members.get(_norm(m.linkname))
                        if target:
                            self.members[_norm(m.name)] = target
        except FileNotFoundError:
            raise NotFound(f"archive {path} does not exist") from None
        except tarfile.TarError as exc:
            raise InvalidLayer(f"{path} is not a readable tar archive ({exc})") from None

    def has(self, name: str) -> bool:
        return _norm(name) in self.members

    def open(self, name: str) -> BinaryIO:
        try:
            offset, size = self.members[_norm(name)]
        except KeyError:
            raise NotFound(f"archive {self.path} has no {name}") from None
        return _Range(self.path, offset, size)

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()


def _familiar(name: str) -> str:
    """docker.io/library/busybox:1 -> busybox:1, as Docker shows names."""
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


# -- OCI layout ----------------------------------------------------------------


class OCILayoutSource(ImageSource):
    """``oci:DIR[:REF]`` and ``oci-archive:FILE[:REF]``."""

    def __init__(self, ref: ImageRef):
        self.ref = ref
        path = Path(ref.path)
        if ref.transport == "oci-archive":
            self._archive: _ArchiveIndex | None = _ArchiveIndex(path)
            self._dir = None
        else:
            if not path.is_dir():
                raise NotFound(f"OCI layout directory {path} does not exist")
            self._archive = None
            self._dir = path
        try:
            layout = json.loads(self._read("oci-layout"))
            index_raw = self._read("index.json")
        except (NotFound, FileNotFoundError):
            raise InvalidLayer(f"{path} is not an OCI image layout (no oci-layout / index.json)") from None
        except ValueError:
            raise InvalidLayer(f"{path}: oci-layout is not JSON") from None
        if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
            raise InvalidLayer(f"{path}: oci-layout has no imageLayoutVersion")
        index = oci.parse_manifest(index_raw, oci.OCI_INDEX)
        if not isinstance(index, oci.Index):
            raise InvalidLayer(f"{path}: index.json is not an image index")
        self._top = self._pick(index, path)

    def _pick(self, index: oci.Index, path: Path) -> oci.Descriptor:
        want = self.ref.ref
        if want:
            found = [d for d in index.manifests if d.annotations.get(REF_NAME) == want]
            if not found:
                names = sorted(filter(None, (d.annotations.get(REF_NAME) for d in index.manifests)))
                raise NotFound(f"OCI layout {path} has no image {want!r} (it has: {', '.join(names) or 'none'})")
            return found[-1]
        if len(index.manifests) != 1:
            names = sorted(filter(None, (d.annotations.get(REF_NAME) for d in index.manifests)))
            raise InvalidOption(f"OCI layout {path} holds {len(index.manifests)} images; name one as {self.ref.transport}:{path}:REF ({', '.join(names)})")
        return index.manifests[0]

    def _read(self, name: str) -> bytes:
        if self._archive is not None:
            return self._archive.read(name)
        return (self._dir / name).read_bytes()

    def _blob_name(self, digest: str) -> str:
        if not digests.is_digest(digest):
            raise InvalidLayer(f"{digest!r} is not a sha256 digest")
        return "blobs/sha256/" + digest.split(":", 1)[1]

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        desc_type = self._top.media_type if digest is None else ""
        digest = digest or self._top.digest
        try:
            raw = self._read(self._blob_name(digest))
        except (NotFound, FileNotFoundError):
            raise NotFound(f"{self.ref}: manifest {digest} is missing from the layout") from None
        if digests.sha256_digest(raw) != digest:
            raise InvalidLayer(f"{self.ref}: manifest {digest} does not match its digest (corrupted)")
        return raw, desc_type

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        name = self._blob_name(digest)
        try:
            if self._archive is not None:
                return self._archive.open(name)
            return open(self._dir / name, "rb")
        except (NotFound, FileNotFoundError):
            raise NotFound(f"{self.ref}: blob {digest} is missing") from None


class OCILayoutDestination(ImageDestination):
    """Writes ``oci:DIR[:REF]`` in place, or ``oci-archive:FILE[:REF]`` at commit."""

    def __init__(self, ref: ImageRef, tmp_root: Path):
        self.ref = ref
        if ref.transport == "oci-archive":
            self._work = Path(tempfile.mkdtemp(prefix="oci-archive-", dir=tmp_root))
            self.dir = self._work / "layout"
        else:
            self._work = None
            self.dir = Path(ref.path)
        (self.dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout = self.dir / "oci-layout"
        if not layout.exists():
            layout.write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self._manifest: tuple[str, int, str] | None = None

    def _blob(self, digest: str) -> Path:
        return self.dir / "blobs" / "sha256" / digest.split(":", 1)[1]

    def has_blob(self, digest: str) -> bool:
        return self._blob(digest).is_file()

    def put_blob(self, digest: str, size: int, path: str) -> None:
        target = self._blob(digest)
        if target.is_file():
            return
        tmp = target.with_name(".tmp-" + target.name)
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def put_manifest(self, raw: bytes, media_type: str) -> None:
        digest = digests.sha256_digest(raw)
        target = self._blob(digest)
        target.write_bytes(raw)
        index_path = self.dir / "index.json"
        try:
            index = json.loads(index_path.read_text())
        except FileNotFoundError:
            index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": []}
        desc = {"mediaType": media_type, "digest": digest, "size": len(raw)}
        if self.ref.ref:
            desc["annotations"] = {REF_NAME: self.ref.ref}
            index["manifests"] = [m for m in index.get("manifests", []) if (m.get("annotations") or {}).get(REF_NAME) != self.ref.ref]
        index.setdefault("manifests", []).append(desc)
        tmp = index_path.with_name(".index.json.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)

    def commit(self) -> None:
        if self._work is None:
            return
        target = Path(self.ref.path)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for name in ("oci-layout", "index.json"):
                tf.add(self.dir / name, arcname=name)
            tf.add(self.dir / "blobs", arcname="blobs")
        os.replace(tmp, target)

    def close(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)


# -- docker-archive ----------------------------------------------------------------


class DockerArchiveSource(ImageSource):
    """``docker-archive:FILE[:NAME:TAG]`` (`docker save` output).

    The archive has no registry manifest, so one is made up (Docker v2
    schema) from its manifest.json; layer digests are those of the layer
    files, which are the diff ids for the usual uncompressed layers.
    """

    def __init__(self, ref: ImageRef):
        self.ref = ref
        self._archive = _ArchiveIndex(Path(ref.path))
        try:
            entries = json.loads(self._archive.read("manifest.json"))
        except NotFound:
            raise InvalidLayer(f"{ref.path} is not a docker-archive (no manifest.json)") from None
        except ValueError:
            raise InvalidLayer(f"{ref.path}: manifest.json is not JSON") from None
        if not isinstance(entries, list) or not entries:
            raise InvalidLayer(f"{ref.path}: manifest.json lists no image")
        entry = self._pick(entries)
        try:
            config_name = entry["Config"]
            layer_names = list(entry["Layers"])
        except (KeyError, TypeError):
            raise InvalidLayer(f"{ref.path}: manifest.json entry lacks Config or Layers") from None
        self._config_raw = self._archive.read(config_name)
        config = oci.parse_config(self._config_raw, f"{ref.path}:{config_name}")
        if len(config.diff_ids) != len(layer_names):
            raise InvalidLayer(
                f"{ref.path}: the config lists {len(config.diff_ids)} diff ids but manifest.json {len(layer_names)} layers"
            )
        self._blobs: dict[str, str] = {}
        layers = []
        for name, diff_id in zip(layer_names, config.diff_ids):
            with self._archive.open(name) as f:
                head = f.read(512)
            compression = archive.sniff_compression(head)
            digest = diff_id if compression == "none" else self._hash(name)
            size = self._archive.members[_norm(name)][1]
            self._blobs[digest] = name
            media = oci.DOCKER_LAYER if compression == "none" else oci.layer_media_type(oci.DOCKER_MANIFEST, compression)
            layers.append({"mediaType": media, "size": size, "digest": digest})
        config_digest = digests.sha256_digest(self._config_raw)
        self._blobs[config_digest] = config_name
        manifest = {
            "schemaVersion": 2,
            "mediaType": oci.DOCKER_MANIFEST,
            "config": {"mediaType": oci.DOCKER_CONFIG, "size": len(self._config_raw), "digest": config_digest},
            "layers": layers,
        }
        self._manifest_raw = oci.canonical_json(manifest)
        tags = entry.get("RepoTags") or []
        self.repo_tag = _familiar(tags[0]) if tags else None

    def _pick(self, entries: list) -> dict:
        if self.ref.ref:
            want = self.ref.ref if ":" in self.ref.ref else self.ref.ref + ":latest"
            for e in entries:
                if want in (e.get("RepoTags") or []):
                    return e
            tags = sorted(t for e in entries for t in (e.get("RepoTags") or []))
            raise NotFound(f"docker-archive {self.ref.path} has no image {want!r} (it has: {', '.join(tags) or 'none'})")
        if len(entries) > 1:
            tags = sorted(t for e in entries for t in (e.get("RepoTags") or []))
            raise InvalidOption(f"docker-archive {self.ref.path} holds {len(entries)} images; name one ({', '.join(tags)})")
        return entries[0]

    def _hash(self, name: str) -> str:
        import hashlib

        sha = hashlib.sha256()
        with self._archive.open(name) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        return "sha256:" + sha.hexdigest()

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        if digest is not None and digest != digests.sha256_digest(self._manifest_raw):
            raise NotFound(f"{self.ref}: no manifest {digest}")
        return self._manifest_raw, oci.DOCKER_MANIFEST

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        name = self._blobs.get(digest)
        if name is None:
            raise NotFound(f"{self.ref}: blob {digest} is missing")
        return self._archive.open(name)


class DockerArchiveDestination(ImageDestination):
    """Writes a `docker load`-able archive at commit: config, uncompressed layer tars, manifest.json."""

    def __init__(self, ref: ImageRef, tmp_root: Path, repo_tag: str | None):
        self.ref = ref
        self.repo_tag = (ref.ref if ref.ref and ":" in ref.ref else (ref.ref + ":latest" if ref.ref else repo_tag))
        self._work = Path(tempfile.mkdtemp(prefix="docker-archive-", dir=tmp_root))
        self._blobs: dict[str, str] = {}
        self._manifest: bytes | None = None

    def has_blob(self, digest: str) -> bool:
        return False

    def put_blob(self, digest: str, size: int, path: str) -> None:
        self._blobs[digest] = path

    def put_manifest(self, raw: bytes, media_type: str) -> None:
        self._manifest = raw

    def commit(self) -> None:
        manifest = oci.parse_manifest(self._manifest or b"", oci.DOCKER_MANIFEST)
        assert isinstance(manifest, oci.Manifest)
        config_hex = manifest.config.digest.split(":", 1)[1]
        target = Path(self.ref.path)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        layer_names = []
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            tf.add(self._blobs[manifest.config.digest], arcname=f"{config_hex}.json")
            for desc in manifest.layers:
                # `docker load` wants uncompressed layer tars.
                with open(self._blobs[desc.digest], "rb") as raw:
                    stream, _ = archive.decompressed(raw)
                    spool = tempfile.TemporaryFile(dir=self._work)
                    with contextlib.closing(stream):
                        shutil.copyfileobj(stream, spool, 1 << 20)
                    size = spool.tell()
                    spool.seek(0)
                    name = f"{desc.digest.split(':', 1)[1]}/layer.tar"
                    ti = tarfile.TarInfo(name)
                    ti.size = size
                    ti.mode = 0o644
                    tf.addfile(ti, spool)
                    spool.close()
                layer_names.append(name)
            entry = [{"Config": f"{config_hex}.json", "RepoTags": [self.repo_tag] if self.repo_tag else [], "Layers": layer_names}]
            data = json.dumps(entry).encode()
            ti = tarfile.TarInfo("manifest.json")
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
        os.replace(tmp, target)

    def close(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)
