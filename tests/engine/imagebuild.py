"""Build small test images from busybox-static, by hand (no layerfs code involved).

An image is three layers: a busybox rootfs; /etc/motd plus files to be
deleted and a directory to be replaced; then a layer that deletes a file
(whiteout) and replaces the directory (opaque marker).  `expected_tree`
gives the flattened rootfs a correct pull must produce.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = ("sh", "ls", "cat", "echo", "id", "pwd", "grep", "mkdir", "rm", "mv", "touch", "sleep", "env", "true", "false")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def _tar(entries: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for entry in entries:
            kind, name = entry[0], entry[1]
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif kind == "file":
                data, mode = entry[2], (entry[3] if len(entry) > 3 else 0o644)
                ti.size, ti.mode = len(data), mode
                tf.addfile(ti, io.BytesIO(data))
            elif kind == "symlink":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, entry[2], 0o777
                tf.addfile(ti)
    return buf.getvalue()


def layers(salt: str = "") -> list[bytes]:
    """The three layer tars; a *salt* makes every layer's content (so its diff id) different."""
    busybox = Path(BUSYBOX).read_bytes()
    base = [("dir", "bin"), ("file", "bin/busybox", busybox, 0o755)]
    base += [("symlink", f"bin/{a}", "busybox") for a in APPLETS]
    base += [
        ("dir", "etc"),
        ("file", "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        ("file", "etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        ("dir", "tmp"),
        ("dir", "root"),
    ] + ([("file", "etc/salt", salt.encode())] if salt else [])
    second = [
        ("dir", "etc"),
        ("file", "etc/motd", b"hello from layer 2\n"),
        ("file", "etc/obsolete.conf", b"to be deleted\n"),
        ("dir", "data"),
        ("file", "data/old1", b"old 1\n"),
        ("dir", "data/sub"),
        ("file", "data/sub/old2", b"old 2\n"),
    ] + ([("file", "etc/salt2", salt.encode())] if salt else [])
    third = [
        ("dir", "etc"),
        ("file", "etc/.wh.obsolete.conf", b""),
        ("dir", "data"),
        ("file", "data/.wh..wh..opq", b""),
        ("file", "data/new", b"new data\n"),
        ("dir", "opt/app"),
        ("file", "opt/app/VERSION", b"1.0\n"),
    ] + ([("file", "etc/salt3", salt.encode())] if salt else [])
    return [_tar(base), _tar(second), _tar(third)]


def expected_tree() -> dict[str, str]:
    """path -> 'dir' | 'link:<target>' | sha256 of content, for the flattened image."""
    tree: dict[str, str] = {"bin": "dir", "etc": "dir", "tmp": "dir", "root": "dir", "data": "dir", "opt": "dir", "opt/app": "dir"}
    tree["bin/busybox"] = hashlib.sha256(Path(BUSYBOX).read_bytes()).hexdigest()
    for a in APPLETS:
        tree[f"bin/{a}"] = "link:busybox"
    tree["etc/passwd"] = hashlib.sha256(b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n").hexdigest()
    tree["etc/group"] = hashlib.sha256(b"root:x:0:\nnogroup:x:65534:\n").hexdigest()
    tree["etc/motd"] = hashlib.sha256(b"hello from layer 2\n").hexdigest()
    tree["data/new"] = hashlib.sha256(b"new data\n").hexdigest()
    tree["opt/app/VERSION"] = hashlib.sha256(b"1.0\n").hexdigest()
    return tree


def tree_of(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


@dataclass
class BuiltImage:
    layout: Path
    ref: str
    manifest_digest: str
    config_digest: str
    diff_ids: list[str]
    layer_digests: list[str]


def config_for(diff_ids: list[str]) -> bytes:
    return json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "imagebuild"}],
    }).encode()


def write_layout(path: Path, ref: str = "v1", compressions=("gzip", "zstd", "none"), tars: list[bytes] | None = None) -> BuiltImage:
    """An OCI image layout at *path* holding the test image under *ref*."""
    tars = tars if tars is not None else layers()
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest, len(data)

    diff_ids, descs = [], []
    for i, data in enumerate(tars):
        how = compressions[i % len(compressions)]
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
        digest, size = put(compress(data, how))
        descs.append({"mediaType": MEDIA[how], "digest": digest, "size": size})
    config_digest, config_size = put(config_for(diff_ids))
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": descs,
    }).encode()
    manifest_digest, manifest_size = put(manifest)
    index_path = path / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"].append({
        "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": ref},
    })
    index_path.write_text(json.dumps(index))
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return BuiltImage(path, ref, manifest_digest, config_digest, diff_ids, [d["digest"] for d in descs])
