"""OCI and Docker image formats: media types, manifests, indexes, configs (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .. import digest as digests
from ..errors import InvalidLayer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

LAYER_COMPRESSION = {
    OCI_LAYER: "none",
    DOCKER_LAYER: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_NONDIST_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_FOREIGN: "gzip",
    OCI_LAYER_ZSTD: "zstd",
}


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict | None = None
    annotations: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


def _descriptor(obj, where: str) -> Descriptor:
    try:
        d = Descriptor(
            media_type=str(obj.get("mediaType", "")),
            digest=obj["digest"],
            size=int(obj["size"]),
            platform=obj.get("platform"),
            annotations=obj.get("annotations") or {},
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InvalidLayer(f"malformed {where}: a descriptor needs digest and size") from None
    if not digests.is_digest(d.digest):
        raise InvalidLayer(f"malformed {where}: {d.digest!r} is not a sha256 digest")
    if d.size < 0:
        raise InvalidLayer(f"malformed {where}: descriptor {d.digest} has a negative size")
    return d


def parse_manifest(raw: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or an index; the media type comes from the body or the caller."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidLayer(f"manifest {digests.sha256_digest(raw)} is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidLayer(f"manifest {digests.sha256_digest(raw)} is not a JSON object")
    kind = doc.get("mediaType") or media_type or ""
    where = f"manifest {digests.sha256_digest(raw)}"
    if kind in INDEX_TYPES or (not kind and "manifests" in doc):
        items = doc.get("manifests")
        if not isinstance(items, list):
            raise InvalidLayer(f"malformed {where}: an index needs a manifests list")
        return Index(kind or OCI_INDEX, tuple(_descriptor(m, where) for m in items))
    if kind in MANIFEST_TYPES or (not kind and "config" in doc):
        if doc.get("schemaVersion") != 2:
            raise InvalidLayer(f"malformed {where}: schemaVersion must be 2")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise InvalidLayer(f"malformed {where}: no layers list")
        return Manifest(kind or OCI_MANIFEST, _descriptor(doc.get("config"), where), tuple(_descriptor(l, where) for l in layers))
    if doc.get("schemaVersion") == 1:
        raise InvalidLayer(f"{where} is a Docker schema 1 manifest, which is deprecated and not supported")
    raise InvalidLayer(f"{where} has an unknown media type {kind!r}")


def platform_of(text: str) -> dict:
    """"linux/amd64" or "linux/arm64/v8" -> a platform dict."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        from ..errors import InvalidOption

        raise InvalidOption(f"platform {text!r} is not OS/ARCH[/VARIANT], e.g. linux/amd64")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def select_platform(index: Index, platform: str) -> Descriptor:
    want = platform_of(platform)
    for d in index.manifests:
        p = d.platform or {}
        if p.get("os") == want["os"] and p.get("architecture") == want["architecture"]:
            if "variant" not in want or p.get("variant") == want["variant"]:
                return d
    have = ", ".join(
        "/".join(x for x in ((d.platform or {}).get("os"), (d.platform or {}).get("architecture"), (d.platform or {}).get("variant")) if x)
        for d in index.manifests
    )
    raise InvalidLayer(f"image has no {platform} manifest (it has: {have or 'none'}); choose one with --platform")


@dataclass(frozen=True)
class ImageConfig:
    raw: bytes
    doc: dict

    @property
    def diff_ids(self) -> list[str]:
        return list(self.doc.get("rootfs", {}).get("diff_ids", []))

    @property
    def container(self) -> dict:
        return self.doc.get("config") or {}


def parse_config(raw: bytes, where: str) -> ImageConfig:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidLayer(f"image config {where} is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidLayer(f"image config {where} is not a JSON object")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
        raise InvalidLayer(f"image config {where} has no rootfs.diff_ids")
    for d in rootfs["diff_ids"]:
        if not digests.is_digest(d):
            raise InvalidLayer(f"image config {where}: diff id {d!r} is not a sha256 digest")
    return ImageConfig(raw, doc)


def canonical_json(obj) -> bytes:
    """Stable JSON bytes for manifests and configs we write."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


def layer_media_type(manifest_type: str, compression: str) -> str:
    if manifest_type == DOCKER_MANIFEST:
        if compression == "zstd":
            return OCI_LAYER_ZSTD  # Docker has no zstd type of its own
        return DOCKER_LAYER_GZIP if compression == "gzip" else DOCKER_LAYER
    return {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}[compression]
