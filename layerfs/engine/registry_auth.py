"""Registry helpers that need no network: hosts, challenges, error bodies, credentials (pure or file-reading)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
from pathlib import Path

from ..errors import InvalidOption
from .reference import DEFAULT_REGISTRY

DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_PARAM_RE = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))')


# ------------------------------------------------------------------ helpers


def _hostname(host: str) -> str:
    """The name part of host[:port] (brackets of an IPv6 literal removed)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_local_host(host: str) -> bool:
    """127.0.0.0/8, ::1, localhost: hosts plain HTTP is allowed for without --tls-verify=false."""
    name = _hostname(host).lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(exc: BaseException) -> str:
    """A short reason for a transport exception (httpx often wraps an OSError)."""
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    while not text and cause is not None:
        text = str(cause)
        cause = cause.__cause__ or cause.__context__
    return _one_line(text or type(exc).__name__, 200)


def parse_creds(creds: str) -> tuple[str, str]:
    user, sep, password = creds.partition(":")
    if not sep or not user:
        raise InvalidOption("--creds must be USER:PASS (a user name, a colon, the password)")
    return user, password


def parse_challenges(values: list[str]) -> list[tuple[str, dict[str, str]]]:
    """``WWW-Authenticate`` headers -> [(scheme lowercased, {param: value})]."""
    out = []
    for value in values:
        scheme, _, rest = value.strip().partition(" ")
        if not scheme:
            continue
        params = {}
        for m in _PARAM_RE.finditer(rest):
            raw = m.group(2) if m.group(2) is not None else m.group(3)
            params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", raw)
        out.append((scheme.lower(), params))
    return out


def error_detail(body: bytes) -> str:
    """A registry's JSON error body ({"errors": [{"code", "message", "detail"}]}) as one short line."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return ""
    parts = []
    for e in errors[:3]:
        if not isinstance(e, dict):
            continue
        text = ": ".join(str(e[k]) for k in ("code", "message") if e.get(k))
        detail = e.get("detail")
        if isinstance(detail, str) and detail:
            text += f" ({detail})"
        elif isinstance(detail, dict) and detail:
            text += " (" + ", ".join(f"{k}={v}" for k, v in list(detail.items())[:3] if isinstance(v, (str, int))) + ")"
        if text:
            parts.append(text)
    return _one_line("; ".join(parts), 240)


def error_codes(body: bytes) -> set[str]:
    try:
        doc = json.loads(body)
        return {str(e.get("code")) for e in doc.get("errors", []) if isinstance(e, dict)}
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
        return set()


# -------------------------------------------------------------- credentials


def default_authfiles() -> list[Path]:
    """Where credentials are looked for, first match wins (as podman/skopeo and docker do)."""
    out = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        out.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    out.append(Path(os.path.expanduser("~")) / ".docker" / "config.json")
    return out


def _normalize_auth_key(key: str) -> str:
    key = key.strip()
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    key = key.rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    first, slash, rest = key.partition("/")
    if first in _DOCKER_HUB_NAMES:
        first = DEFAULT_REGISTRY
    return first + slash + rest


def _decode_entry(entry, key: str, path: Path) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            text = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidOption(f"auth file {path}: the entry for {key} is not base64 of USER:PASS; log in again or fix it") from None
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise InvalidOption(f"auth file {path}: the entry for {key} is not base64 of USER:PASS; log in again or fix it")
        return user, password
    if isinstance(entry.get("username"), str) and entry.get("username") and isinstance(entry.get("password"), str):
        return entry["username"], entry["password"]
    return None  # e.g. an entry of a credential helper ({}): not ours to read


def credentials_from_authfile(host: str, repository: str = "", authfile: str | os.PathLike | None = None) -> tuple[str, str] | None:
    """USER, PASS for *host* (and *repository*, most specific key first) from an auth.json, or None.

    *authfile* None searches :func:`default_authfiles`; a given file must exist.
    """
    if authfile is not None:
        paths = [Path(authfile)]
        if not paths[0].is_file():
            raise InvalidOption(f"auth file {authfile} does not exist; pass an existing --authfile or --creds USER:PASS")
    else:
        paths = default_authfiles()
    host_key = _normalize_auth_key(host)
    wanted = []
    if repository:
        parts = repository.split("/")
        wanted += [f"{host_key}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)]
    wanted.append(host_key)
    for path in paths:
        try:
            text = path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise InvalidOption(f"cannot read auth file {path}: {e.strerror}; fix its permissions or pass --creds USER:PASS") from None
        try:
            doc = json.loads(text)
        except ValueError:
            raise InvalidOption(f"auth file {path} is not JSON; fix or remove it, or pass --creds USER:PASS") from None
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        by_key = {}
        for key, entry in auths.items():
            by_key.setdefault(_normalize_auth_key(str(key)), (key, entry))
        for want in wanted:
            if want in by_key:
                key, entry = by_key[want]
                found = _decode_entry(entry, key, path)
                if found:
                    return found
    return None


# ------------------------------------------------------------------- client
