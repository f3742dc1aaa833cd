"""Image references in skopeo's transport syntax (pure).

    oci:DIR[:REF]                 an OCI image layout directory
    oci-archive:FILE[:REF]        the same, as a tar file
    docker-archive:FILE[:REF]     `docker save` output
    docker://HOST[:PORT]/NAME[:TAG|@DIGEST]   a registry (Docker Registry HTTP API v2)

A bare name (``busybox``, ``localhost:5000/app:1``) means ``docker://``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidOption

TRANSPORTS = ("oci", "oci-archive", "docker-archive", "docker")
DEFAULT_REGISTRY = "docker.io"

_UNSUPPORTED = ("containers-storage", "dir", "docker-daemon", "ostree", "sif", "tarball")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


@dataclass(frozen=True)
class ImageRef:
    transport: str  # one of TRANSPORTS
    path: str = ""  # oci / oci-archive / docker-archive: the directory or file
    ref: str | None = None  # oci*: the ref.name annotation; docker-archive: name:tag inside
    host: str = ""  # docker: registry host[:port]
    repository: str = ""  # docker: e.g. "library/busybox"
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.transport == "docker":
            tail = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
            return f"docker://{self.host}/{self.repository}{tail}"
        return f"{self.transport}:{self.path}" + (f":{self.ref}" if self.ref else "")

    @property
    def reference(self) -> str:
        """The tag or digest to ask a registry for."""
        return self.digest or self.tag or "latest"

    @property
    def short_name(self) -> str:
        """A default local image name: repository:tag for registries, the ref (or file stem) otherwise."""
        if self.transport == "docker":
            repo = self.repository
            if self.host == DEFAULT_REGISTRY and repo.startswith("library/"):
                repo = repo[len("library/") :]
            name = repo if self.host == DEFAULT_REGISTRY else f"{self.host}/{repo}"
            return f"{name}@{self.digest}" if self.digest and not self.tag else f"{name}:{self.tag or 'latest'}"
        stem = (self.path.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0] or "image").lower()
        if self.ref:
            if ":" in self.ref.rsplit("/", 1)[-1]:
                return self.ref  # a full name:tag
            return f"{stem}:{self.ref}" if self.transport != "docker-archive" else f"{self.ref}:latest"
        return f"{stem}:latest"


def parse(text: str) -> ImageRef:
    """Parse a transport reference; raises InvalidOption naming what is wrong."""
    if not text:
        raise InvalidOption("empty image reference; use e.g. docker://localhost:5000/app:1 or oci:DIR:TAG")
    transport, sep, rest = text.partition(":")
    if sep and transport in ("oci", "oci-archive", "docker-archive"):
        if not rest:
            raise InvalidOption(f"image reference {text!r} names no path; use {transport}:PATH[:REF]")
        path, _, ref = rest.partition(":")
        return ImageRef(transport, path=path, ref=ref or None)
    if text.startswith("docker://"):
        return _parse_docker(text[len("docker://") :], text)
    if sep and transport in _UNSUPPORTED:
        raise InvalidOption(f"transport {transport!r} in {text!r} is not supported; use one of {', '.join(TRANSPORTS)}")
    return _parse_docker(text, text)


def _parse_docker(rest: str, text: str) -> ImageRef:
    if not rest:
        raise InvalidOption(f"image reference {text!r} names no repository")
    name, digest = rest, None
    if "@" in rest:
        name, _, digest = rest.partition("@")
        if not _DIGEST_RE.match(digest):
            raise InvalidOption(f"image reference {text!r}: {digest!r} is not a sha256:<64 hex> digest")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not _TAG_RE.match(tag):
            raise InvalidOption(f"image reference {text!r}: {tag!r} is not a valid tag")
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        host, repository = first, remainder
    else:
        host, repository = DEFAULT_REGISTRY, name
        if "/" not in repository:
            repository = "library/" + repository
    for component in repository.split("/"):
        if not _NAME_COMPONENT_RE.match(component):
            raise InvalidOption(f"image reference {text!r}: {repository!r} is not a valid repository name (lowercase)")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef("docker", host=host, repository=repository, tag=tag, digest=digest)
