"""Registries: the OCI distribution / Docker Registry HTTP API v2 over httpx.

:class:`RegistryClient` speaks the protocol for one registry host: manifests
(GET with an ``Accept`` for OCI and Docker manifests and indexes, PUT),
blobs (HEAD, streamed GET with resume, monolithic or chunked upload) and
authentication (anonymous first; on a 401 the ``WWW-Authenticate`` challenge
says ``Bearer`` -- a token from the realm, fetched with the credentials when
there are any and cached per scope -- or ``Basic``).  Credentials come from
``creds="USER:PASS"`` or a docker-style ``auth.json``.

The client is synchronous and thread-safe: the engine runs blob transfers in
worker threads (under trio) and they share one connection pool.

Plain HTTP is used only for 127.0.0.1 / localhost / [::1] or with
``tls_verify=False`` (then HTTPS without certificate checks is tried first);
everything else is HTTPS with verified certificates.

:class:`RegistrySource` and :class:`RegistryDestination` put the client
behind the transport interfaces of :mod:`.sources` for a ``docker://``
reference.  Every failure is a :class:`~layerfs.errors.LayerfsError` with a
one-line message that names the host, repository and digest involved.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import httpx

from .. import digest as digests
from ..errors import DigestMismatch, InvalidLayer, InvalidOption, LayerfsError, NotFound, RegistryError
from . import oci
from .reference import ImageRef
from .registry_auth import (  # re-exported: the transport's public helpers
    DOCKER_HUB_API,
    HOST_RE,
    describe_error,
    credentials_from_authfile,
    error_codes,
    error_detail,
    is_local_host,
    parse_challenges,
    parse_creds,
)
from .sources import ImageDestination, ImageSource

CHUNK = 1 << 20
DEFAULT_CHUNK_SIZE = 8 << 20
MAX_MANIFEST = 4 << 20  # distribution's own limit for a manifest body
MAX_ERROR_BODY = 64 << 10
RESUME_ATTEMPTS = 2  # a dropped blob download is resumed (Range) this many times
STATUS_RETRIES = 2  # GET/HEAD answered 429/502/503/504 are retried this many times
USER_AGENT = "layerfs/0.1 (+httpx)"

_RETRY_STATUS = (429, 502, 503, 504)


class _LazyTransport(httpx.BaseTransport):
    """A transport built on its first request (thread-safe)."""

    def __init__(self, build: Callable[[], httpx.BaseTransport]):
        self._build = build
        self._inner: httpx.BaseTransport | None = None
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            if self._inner is None:
                self._inner = self._build()
        return self._inner.handle_request(request)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()


class RegistryClient:
    """One registry host; thread-safe.  See the module docstring."""

    def __init__(
        self,
        host: str,
        tls_verify: bool = True,
        creds: str | None = None,
        authfile: str | os.PathLike | None = None,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ):
        if not host or not HOST_RE.match(host):
            raise InvalidOption(f"registry host {host!r} is not HOST[:PORT]")
        self.host = host
        self.api_host = DOCKER_HUB_API if host in ("docker.io", "index.docker.io") else host
        self.tls_verify = tls_verify
        if is_local_host(self.api_host):
            self._schemes = ("http",)
        elif tls_verify:
            self._schemes = ("https",)
        else:
            self._schemes = ("https", "http")  # unverified TLS first, then plain HTTP
        self._base: str | None = f"{self._schemes[0]}://{self.api_host}" if len(self._schemes) == 1 else None
        self._creds = parse_creds(creds) if creds is not None else None
        self._authfile = authfile
        if authfile is not None and not Path(authfile).is_file():
            raise InvalidOption(f"auth file {authfile} does not exist; pass an existing --authfile or --creds USER:PASS")
        self._file_creds: dict[str, tuple[str, str] | None] = {}
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, monotonic expiry)
        self._basic = False  # the registry asked for Basic auth
        self.token_requests = 0
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
        mounts = None
        if transport is None and self._schemes == ("http",):
            # Why: building a verifying TLS context loads the CA bundle
            # (50-250 ms), and a local registry speaks plain HTTP; only a
            # token realm elsewhere may need HTTPS, verified as always.
            transport = httpx.HTTPTransport(verify=False, limits=limits)
            mounts = {"https://": _LazyTransport(lambda: httpx.HTTPTransport(verify=tls_verify, limits=limits))}
        self._client = httpx.Client(
            verify=tls_verify,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            limits=limits,
            transport=transport,
            mounts=mounts,
        )

    # ------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def base_url(self) -> str:
        """scheme://host, choosing HTTPS or HTTP on first use for an insecure registry."""
        if self._base is None:
            with self._lock:
                if self._base is None:
                    self._base = self._probe_scheme()
        return self._base

    def _probe_scheme(self) -> str:
        first_error = None
        for scheme in self._schemes:
            base = f"{scheme}://{self.api_host}"
            try:
                self._client.get(base + "/v2/").close()
                return base
            except httpx.TransportError as e:
                first_error = first_error or e
        raise RegistryError(f"cannot reach registry {self.host}: {describe_error(first_error)}")

    def _url(self, repo: str, tail: str) -> str:
        return f"{self.base_url}/v2/{repo}/{tail}"

    def _credentials(self, repo: str) -> tuple[str, str] | None:
        if self._creds is not None:
            return self._creds
        if repo not in self._file_creds:
            self._file_creds[repo] = credentials_from_authfile(self.host, repo, self._authfile)
        return self._file_creds[repo]

    @staticmethod
    def _scope(repo: str, push: bool) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    def _auth_header(self, scope: str, repo: str) -> str | None:
        if self._basic:
            creds = self._credentials(repo)
            if creds:
                return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        now = time.monotonic()
        with self._lock:
            candidates = [scope]
            if scope.endswith(":pull"):
                candidates.append(scope + ",push")
            for key in candidates:
                found = self._tokens.get(key)
                if found and found[1] > now:
                    return "Bearer " + found[0]
        return None

    def _fetch_token(self, realm: str, service: str | None, scopes: list[str], repo: str) -> tuple[str, float]:
        params = [("service", service)] if service else []
        params += [("scope", s) for s in scopes]
        creds = self._credentials(repo)
        if creds:
            params.append(("account", creds[0]))
        where = f"{self.host}/{repo}"
        try:
            resp = self._client.get(realm, params=params, auth=httpx.BasicAuth(*creds) if creds else None, follow_redirects=True)
        except httpx.TransportError as e:
            raise RegistryError(f"cannot reach the token server {realm} of {where}: {describe_error(e)}") from None
        except httpx.InvalidURL:
            raise RegistryError(f"registry {self.host} names an invalid token realm {realm!r}") from None
        self.token_requests += 1
        if resp.status_code in (401, 403):
            detail = error_detail(resp.content[:MAX_ERROR_BODY])
            if creds:
                msg = f"authentication denied for {where}: the token server rejected the credentials of {creds[0]!r}; check --creds USER:PASS or log in again"
            else:
                msg = f"authentication required for {where}; pass --creds USER:PASS or log in"
            raise RegistryError(msg + (f" (HTTP {resp.status_code}: {detail})" if detail else f" (HTTP {resp.status_code})"))
        if resp.status_code != 200:
            raise RegistryError(f"token server {realm} of {where} answered HTTP {resp.status_code}")
        try:
            doc = resp.json()
            token = doc.get("token") or doc.get("access_token")
            expires_in = int(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server {realm} of {where} answered without a token")
        # Renew a little before the token expires (but keep short ones usable).
        return token, time.monotonic() + max(expires_in - 10, min(expires_in, 10))

    def _authenticate(self, resp: httpx.Response, scope: str, repo: str, sent: str | None, tried: set[str]) -> bool:
        """After a 401: get credentials the challenge asks for; False when nothing new can be tried."""
        challenges = parse_challenges(resp.headers.get_list("www-authenticate"))
        for scheme, params in challenges:
            if scheme == "bearer" and params.get("realm") and "bearer" not in tried:
                tried.add("bearer")
                scopes = scope.split()
                for s in (params.get("scope") or "").split():
                    if s not in scopes:
                        scopes.append(s)
                token = self._fetch_token(params["realm"], params.get("service"), scopes, repo)
                with self._lock:
                    self._tokens[scope] = token
                return True
            if scheme == "basic" and "basic" not in tried:
                tried.add("basic")
                if self._credentials(repo) is None or (sent or "").startswith("Basic "):
                    return False
                self._basic = True
                return True
        return False

    def _request(
        self,
        method: str,
        url: str,
        *,
        repo: str,
        push: bool = False,
        headers: dict | None = None,
        body: bytes | Callable[[], Iterator[bytes]] | None = None,
        stream: bool = False,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Send with authentication (anonymous first, then what a 401 asks for).

        Returns the final response, whatever its status; *body* is bytes or a
        callable making a fresh iterator (a request may be sent again after a 401).
        With *stream* the caller closes the response.
        """
        scope = self._scope(repo, push)
        tried: set[str] = set()
        status_retries = 0
        own = url.startswith(self.base_url + "/")
        while True:
            hdrs = dict(headers or {})
            auth = self._auth_header(scope, repo) if own else None
            if auth:
                hdrs["Authorization"] = auth
            content = body() if callable(body) else body
            try:
                request = self._client.build_request(method, url, headers=hdrs, content=content)
                resp = self._client.send(request, stream=stream, follow_redirects=follow_redirects)
            except httpx.ConnectError as e:
                hint = "; use --tls-verify=false for a registry without a trusted certificate" if "CERTIFICATE_VERIFY_FAILED" in str(e) else ""
                raise RegistryError(f"cannot reach registry {self.host}: {describe_error(e)}{hint}") from None
            except httpx.TimeoutException as e:
                raise RegistryError(f"registry {self.host} timed out on {method} {url} ({type(e).__name__})") from None
            except httpx.TransportError as e:
                raise RegistryError(f"connection to registry {self.host} failed on {method} {url}: {describe_error(e)}") from None
            except httpx.InvalidURL as e:
                raise RegistryError(f"registry {self.host} gave an invalid URL {url!r}: {e}") from None
            if resp.status_code == 401 and own:
                if self._authenticate(resp, scope, repo, auth, tried):
                    resp.close()
                    continue
                return resp
            if resp.status_code in _RETRY_STATUS and method in ("GET", "HEAD") and status_retries < STATUS_RETRIES:
                status_retries += 1
                resp.close()
                try:
                    delay = min(float(resp.headers.get("retry-after", "")), 5.0)
                except ValueError:
                    delay = 0.5 * status_retries
                time.sleep(max(delay, 0.0))
                continue
            return resp

    @staticmethod
    def _body(resp: httpx.Response, limit: int = MAX_ERROR_BODY) -> bytes:
        """At most *limit* bytes of a (possibly streamed) response body; b"" when unreadable."""
        if resp.request.method == "HEAD":
            return b""
        try:
            if hasattr(resp, "_content"):
                return resp.content[:limit]
            out = bytearray()
            for chunk in resp.iter_bytes():
                out += chunk
                if len(out) >= limit:
                    break
            return bytes(out[:limit])
        except (httpx.HTTPError, httpx.StreamError):
            return b""

    def _failure(self, resp: httpx.Response, repo: str, *, what: str, manifest: str | None = None, blob: str | None = None) -> LayerfsError:
        """The error for an unexpected response (the caller closes it)."""
        status = resp.status_code
        body = self._body(resp)
        detail = error_detail(body)
        suffix = f" (HTTP {status}: {detail})" if detail else f" (HTTP {status})"
        where = f"{self.host}/{repo}"
        sent_auth = "authorization" in resp.request.headers
        if status == 401:
            if sent_auth and (self._creds or self._credentials(repo)):
                return RegistryError(f"authentication denied for {where}: the credentials were refused; check --creds USER:PASS or log in again{suffix}")
            return RegistryError(f"authentication required for {where} (or the repository does not exist); pass --creds USER:PASS or log in{suffix}")
        if status == 403:
            return RegistryError(f"authentication denied for {where}: no permission to {what}; pass --creds USER:PASS of an account with access or log in{suffix}")
        if status == 404 and manifest is not None:
            sep = "@" if digests.is_digest(manifest) else ":"
            return NotFound(f"image {repo}{sep}{manifest} not found on {self.host}{suffix}")
        if status == 404 and blob is not None:
            return NotFound(f"blob {blob} not found in {where}{suffix}")
        if status == 400 and "DIGEST_INVALID" in error_codes(body) and blob is not None:
            return DigestMismatch(f"registry {self.host} rejected blob {blob} for {repo}: its content does not match the digest{suffix}")
        if status >= 500:
            return RegistryError(f"registry {self.host} answered HTTP {status} to {resp.request.method} {resp.request.url} ({what}){': ' + detail if detail else ''}")
        return RegistryError(f"registry {self.host} refused to {what}{suffix}")

    def _location(self, resp: httpx.Response, repo: str, digest: str) -> str:
        location = resp.headers.get("location")
        if not location:
            raise RegistryError(f"registry {self.host} gave no upload location for blob {digest} in {repo}")
        return str(resp.url.join(location))

    # ---------------------------------------------------------------- API

    def ping(self) -> None:
        """GET /v2/: raises RegistryError when the host does not speak the API (401 is fine)."""
        try:
            resp = self._client.get(self.base_url + "/v2/")
        except httpx.TransportError as e:
            raise RegistryError(f"cannot reach registry {self.host}: {describe_error(e)}") from None
        if resp.status_code not in (200, 401):
            raise RegistryError(f"{self.host} is not a registry: GET /v2/ answered HTTP {resp.status_code}")

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(raw bytes, media type, digest) of a manifest or index, verified.

        A digest reference must match the body; for a tag the registry's
        ``Docker-Content-Digest`` (when it sends one) must.
        """
        what = f"get manifest {repo}:{reference}"
        resp = self._request("GET", self._url(repo, f"manifests/{reference}"), repo=repo, headers={"Accept": oci.ACCEPT}, stream=True, follow_redirects=True)
        try:
            if resp.status_code != 200:
                raise self._failure(resp, repo, what=what, manifest=reference)
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_MANIFEST:
                raise InvalidLayer(f"manifest {repo}:{reference} on {self.host} is {declared} bytes, more than the {MAX_MANIFEST} a manifest may have")
            raw = bytearray()
            try:
                for chunk in resp.iter_bytes():
                    raw += chunk
                    if len(raw) > MAX_MANIFEST:
                        raise InvalidLayer(f"manifest {repo}:{reference} on {self.host} is larger than the {MAX_MANIFEST} bytes a manifest may have")
            except httpx.TransportError as e:
                raise RegistryError(f"connection to registry {self.host} dropped while reading manifest {repo}:{reference}: {describe_error(e)}") from None
            raw = bytes(raw)
        finally:
            resp.close()
        actual = digests.sha256_digest(raw)
        if digests.is_digest(reference) and actual != reference:
            raise DigestMismatch(f"manifest {reference} from {self.host}/{repo} has digest {actual} (corrupted)")
        announced = resp.headers.get("docker-content-digest", "")
        if digests.is_digest(announced) and announced != actual:
            raise DigestMismatch(f"manifest {repo}:{reference} from {self.host} has digest {actual} but the registry says {announced} (corrupted)")
        media_type = resp.headers.get("content-type", "").split(";", 1)[0].strip()
        if media_type not in oci.MANIFEST_TYPES + oci.INDEX_TYPES:
            try:
                body_type = json.loads(raw).get("mediaType")
            except (ValueError, UnicodeDecodeError, AttributeError):
                body_type = None
            if isinstance(body_type, str) and body_type:
                media_type = body_type
        return raw, media_type, actual

    def put_manifest(self, repo: str, reference: str, raw: bytes, media_type: str) -> str:
        """Store a manifest under a tag or its digest; returns its digest."""
        actual = digests.sha256_digest(raw)
        if digests.is_digest(reference) and reference != actual:
            raise DigestMismatch(f"manifest for {repo}@{reference} has digest {actual}; push it by its own digest or a tag")
        sep = "@" if digests.is_digest(reference) else ":"
        resp = self._request("PUT", self._url(repo, f"manifests/{reference}"), repo=repo, push=True, headers={"Content-Type": media_type}, body=raw)
        with contextlib.closing(resp):
            if resp.status_code not in (200, 201, 202, 204):
                raise self._failure(resp, repo, what=f"store manifest {actual} as {repo}{sep}{reference}")
        return actual

    def delete_manifest(self, repo: str, digest: str) -> None:
        resp = self._request("DELETE", self._url(repo, f"manifests/{digest}"), repo=repo, push=True)
        with contextlib.closing(resp):
            if resp.status_code not in (200, 202, 204):
                raise self._failure(resp, repo, what=f"delete manifest {digest}", manifest=digest)

    def blob_exists(self, repo: str, digest: str) -> bool:
        resp = self._request("HEAD", self._url(repo, f"blobs/{digest}"), repo=repo, follow_redirects=True)
        with contextlib.closing(resp):
            if resp.status_code == 200:
                return True
            if resp.status_code == 404:
                return False
            raise self._failure(resp, repo, what=f"check blob {digest}")

    def open_blob(self, repo: str, digest: str, size: int | None = None) -> BinaryIO:
        """A buffered stream of the blob's bytes (redirects followed; a dropped
        connection resumed with Range).  Errors of the request itself (404, 401,
        5xx, unreachable) are raised here; the caller verifies the content,
        except that more bytes than *size* raise DigestMismatch."""
        return io.BufferedReader(_BlobReader(self, repo, digest, size), buffer_size=CHUNK)

    @contextlib.contextmanager
    def blob_stream(self, repo: str, digest: str, size: int | None = None) -> Iterator[BinaryIO]:
        stream = self.open_blob(repo, digest, size)
        try:
            yield stream
        finally:
            stream.close()

    def download_blob(self, repo: str, digest: str, size: int | None, dest_path, progress: Callable[[int], None] | None = None) -> Path:
        """Write the blob to *dest_path*, verifying size and sha256 while writing.

        Raises DigestMismatch for a corrupted or truncated blob; *dest_path* is
        removed on any failure.
        """
        dest = Path(dest_path)
        sha = hashlib.sha256()
        count = 0
        try:
            with self.blob_stream(repo, digest, size) as src, open(dest, "wb") as out:
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    sha.update(chunk)
                    count += len(chunk)
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))
            if size is not None and count != size:
                raise DigestMismatch(f"blob {digest} from {self.host}/{repo} has {count} bytes, expected {size} (truncated or corrupted)")
            actual = "sha256:" + sha.hexdigest()
            if actual != digest:
                raise DigestMismatch(f"blob {digest} from {self.host}/{repo} has digest {actual} (corrupted)")
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return dest

    def upload_blob(
        self,
        repo: str,
        digest: str,
        path,
        size: int,
        chunked: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload the file at *path* as blob *digest*: POST a session, then one
        PUT ?digest= with the whole body, or PATCHes of *chunk_size* bytes
        (Content-Range) and a closing PUT."""
        if chunk_size <= 0:
            raise InvalidOption(f"chunk size {chunk_size} must be positive")
        try:
            actual_size = os.stat(path).st_size
        except OSError as e:
            raise NotFound(f"blob {digest} to upload: cannot read {path}: {e.strerror}") from None
        if actual_size != size:
            raise DigestMismatch(f"blob {digest} at {path} has {actual_size} bytes, expected {size}")
        resp = self._request("POST", self._url(repo, "blobs/uploads/"), repo=repo, push=True, body=b"")
        with contextlib.closing(resp):
            if resp.status_code == 201:  # the registry already had it (mounted)
                return
            if resp.status_code != 202:
                raise self._failure(resp, repo, what=f"start the upload of blob {digest}", blob=digest)
            location = self._location(resp, repo, digest)
        try:
            if not chunked:
                resp = self._request(
                    "PUT",
                    str(httpx.URL(location).copy_merge_params({"digest": digest})),
                    repo=repo,
                    push=True,
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                    body=lambda: _file_chunks(path, size, progress),
                )
            else:
                offset = 0
                with open(path, "rb") as f:
                    while offset < size:
                        data = f.read(min(chunk_size, size - offset))
                        if not data:
                            raise DigestMismatch(f"blob {digest} at {path} shrank while it was uploaded")
                        resp = self._request(
                            "PATCH",
                            location,
                            repo=repo,
                            push=True,
                            headers={
                                "Content-Type": "application/octet-stream",
                                "Content-Range": f"{offset}-{offset + len(data) - 1}",
                                "Content-Length": str(len(data)),
                            },
                            body=data,
                        )
                        with contextlib.closing(resp):
                            if resp.status_code != 202:
                                raise self._failure(resp, repo, what=f"upload bytes {offset}-{offset + len(data) - 1} of blob {digest}", blob=digest)
                            location = self._location(resp, repo, digest)
                        offset += len(data)
                        if progress:
                            progress(len(data))
                resp = self._request(
                    "PUT",
                    str(httpx.URL(location).copy_merge_params({"digest": digest})),
                    repo=repo,
                    push=True,
                    headers={"Content-Length": "0"},
                    body=b"",
                )
            with contextlib.closing(resp):
                if resp.status_code not in (201, 204):
                    raise self._failure(resp, repo, what=f"finish the upload of blob {digest}", blob=digest)
        except BaseException:
            self._cancel_upload(location, repo)
            raise

    def _cancel_upload(self, location: str, repo: str) -> None:
        with contextlib.suppress(LayerfsError, httpx.HTTPError):
            self._request("DELETE", location, repo=repo, push=True).close()


def _file_chunks(path, size: int, progress: Callable[[int], None] | None) -> Iterator[bytes]:
    sent = 0
    with open(path, "rb") as f:
        while sent < size:
            chunk = f.read(min(CHUNK, size - sent))
            if not chunk:
                break
            sent += len(chunk)
            if progress:
                progress(len(chunk))
            yield chunk


class _BlobReader(io.RawIOBase):
    """The body of GET /v2/<repo>/blobs/<digest>, resumed with Range after a dropped connection."""

    def __init__(self, client: RegistryClient, repo: str, digest: str, size: int | None):
        super().__init__()
        self._client, self._repo, self._digest, self._size = client, repo, digest, size
        self._pos = 0  # bytes handed out
        self._resumes = 0
        self._resp: httpx.Response | None = None
        self._iter: Iterator[bytes] | None = None
        self._buf = memoryview(b"")
        self._skip = 0
        self._open(0)

    @property
    def _where(self) -> str:
        return f"{self._client.host}/{self._repo}"

    def _open(self, offset: int) -> None:
        client = self._client
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = client._request("GET", client._url(self._repo, f"blobs/{self._digest}"), repo=self._repo, headers=headers, stream=True, follow_redirects=True)
        try:
            if resp.status_code not in (200, 206):
                raise client._failure(resp, self._repo, what=f"get blob {self._digest}", blob=self._digest)
            skip = 0
            if offset:
                content_range = resp.headers.get("content-range", "")
                if resp.status_code != 206 or not content_range.startswith(f"bytes {offset}-"):
                    skip = offset  # the server sent it all again: drop what we already have
            length = resp.headers.get("content-length", "")
            if self._size is not None and length.isdigit():
                expected = self._size - offset + skip
                if int(length) != expected:
                    raise DigestMismatch(f"blob {self._digest} from {self._where}: the registry sends {int(length) - skip + offset} bytes, expected {self._size} (truncated or corrupted)")
        except BaseException:
            resp.close()
            raise
        self._resp, self._iter, self._skip = resp, resp.iter_bytes(), skip

    def _close_response(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp = self._iter = None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not len(self._buf):
            if self._iter is None:
                return 0
            try:
                chunk = next(self._iter)
            except StopIteration:
                self._close_response()
                return 0
            except httpx.TransportError as e:
                self._close_response()
                if self._resumes < RESUME_ATTEMPTS:
                    self._resumes += 1
                    self._open(self._pos)
                    continue
                raise RegistryError(
                    f"connection to registry {self._client.host} dropped while reading blob {self._digest} from {self._repo} "
                    f"after {self._pos} bytes ({describe_error(e)}); retry the command"
                ) from None
            if self._skip:
                drop = min(self._skip, len(chunk))
                self._skip -= drop
                chunk = chunk[drop:]
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self._pos += n
        if self._size is not None and self._pos > self._size:
            raise DigestMismatch(f"blob {self._digest} from {self._where} is longer than its {self._size} bytes (corrupted)")
        return n

    def close(self) -> None:
        self._close_response()
        super().close()


# ---------------------------------------------------------------- transports


def _check_ref(ref: ImageRef) -> None:
    if ref.transport != "docker" or not ref.host or not ref.repository:
        raise InvalidOption(f"{ref} is not a registry reference; use docker://HOST[:PORT]/NAME[:TAG|@DIGEST]")


class RegistrySource(ImageSource):
    """Pull side of ``docker://HOST/NAME[:TAG|@DIGEST]``."""

    def __init__(self, ref: ImageRef, *, tls_verify: bool = True, creds: str | None = None, authfile=None, chunked: bool = False, client: RegistryClient | None = None):
        _check_ref(ref)
        self.ref = ref
        self._owns_client = client is None
        self.client = client or RegistryClient(ref.host, tls_verify=tls_verify, creds=creds, authfile=authfile)
        self.manifest_digest: str | None = None  # of the reference's own manifest, once fetched

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str]:
        raw, media_type, actual = self.client.get_manifest(self.ref.repository, digest or self.ref.reference)
        if digest is None:
            self.manifest_digest = actual
        return raw, media_type

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        return self.client.open_blob(self.ref.repository, digest, size)

    def download_blob(self, digest: str, size: int | None, dest_path, progress=None) -> Path:
        return self.client.download_blob(self.ref.repository, digest, size, dest_path, progress)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


class RegistryDestination(ImageDestination):
    """Push side: blobs the registry already has are skipped; the manifest is
    stored under the reference's tag (or its digest)."""

    def __init__(
        self,
        ref: ImageRef,
        *,
        tls_verify: bool = True,
        creds: str | None = None,
        authfile=None,
        chunked: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        client: RegistryClient | None = None,
        progress: Callable[[str, int], None] | None = None,
    ):
        _check_ref(ref)
        self.ref = ref
        self.chunked = chunked
        self.chunk_size = chunk_size
        self._progress = progress
        self._owns_client = client is None
        self.client = client or RegistryClient(ref.host, tls_verify=tls_verify, creds=creds, authfile=authfile)
        self._known: set[str] = set()
        self.uploaded: list[str] = []
        self.skipped: list[str] = []
        self.manifest_digest: str | None = None

    def has_blob(self, digest: str) -> bool:
        if digest in self._known:
            return True
        if self.client.blob_exists(self.ref.repository, digest):
            self._known.add(digest)
            return True
        return False

    def put_blob(self, digest: str, size: int, path: str) -> None:
        if self.has_blob(digest):
            self.skipped.append(digest)
            return
        progress = (lambda n: self._progress(digest, n)) if self._progress else None
        self.client.upload_blob(self.ref.repository, digest, path, size, chunked=self.chunked, chunk_size=self.chunk_size, progress=progress)
        self._known.add(digest)
        self.uploaded.append(digest)

    def put_manifest_by_digest(self, raw: bytes, media_type: str) -> str:
        """Store a manifest without tagging it (the members of an index)."""
        return self.client.put_manifest(self.ref.repository, digests.sha256_digest(raw), raw, media_type)

    def put_manifest(self, raw: bytes, media_type: str) -> None:
        actual = digests.sha256_digest(raw)
        if self.ref.digest and self.ref.digest != actual:
            raise DigestMismatch(f"manifest to push to {self.ref} has digest {actual}; push it to a tag or to @{actual}")
        reference = self.ref.tag or self.ref.digest or "latest"
        self.manifest_digest = self.client.put_manifest(self.ref.repository, reference, raw, media_type)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()
