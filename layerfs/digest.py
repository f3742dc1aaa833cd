"""Content digests as the OCI image spec defines them (pure functions)."""

from __future__ import annotations

import hashlib
import re

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(parent_chain_id: str | None, diff_id: str) -> str:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256("<ChainID(Ln-1)> <DiffID(Ln)>")."""
    if parent_chain_id is None:
        return diff_id
    return sha256_digest(f"{parent_chain_id} {diff_id}".encode())


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain id of every prefix of a list of diff ids, base first."""
    out: list[str] = []
    parent = None
    for diff_id in diff_ids:
        parent = chain_id(parent, diff_id)
        out.append(parent)
    return out


def short(digest: str, length: int = 12) -> str:
    """The form shown to users: hex without the algorithm, cut to *length*."""
    return digest.split(":", 1)[-1][:length]
