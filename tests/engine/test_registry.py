"""The registry transport against a real registry (Debian's docker-registry).

Round trips of blobs (monolithic and chunked upload, HEAD skipping, verified
download) and manifests (OCI and Docker media types, indexes, by tag and by
digest); authentication (htpasswd basic, bearer tokens from a token server,
credentials from auth.json); and the error paths, through a fault-injecting
proxy: corrupted, truncated and cut blobs, 500s, 404s, an unreachable host.
Every error must be a LayerfsError with a one-line message naming the digest
or repository.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import random
from pathlib import Path

import pytest

from layerfs.engine import oci
from layerfs.engine.content import ContentStore
from layerfs.engine.reference import parse
from layerfs.engine.registry import (
    RegistryClient,
    RegistryDestination,
    RegistrySource,
    credentials_from_authfile,
    error_detail,
    is_local_host,
    parse_challenges,
)
from layerfs.errors import DigestMismatch, InvalidOption, LayerfsError, NotFound, RegistryError

from .conftest import free_port


# ------------------------------------------------------------------ helpers


def data_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_file(tmp_path: Path, data: bytes) -> tuple[str, int, Path]:
    digest = sha(data)
    path = tmp_path / f"blob-{digest[7:19]}"
    path.write_bytes(data)
    return digest, len(data), path


def check_error(err: BaseException, cls: type, *needles: str) -> str:
    """The error is a LayerfsError of *cls* with a one-line message containing every needle."""
    assert isinstance(err, LayerfsError), f"{type(err).__name__}: {err}"
    assert isinstance(err, cls), f"expected {cls}, got {type(err).__name__}: {err}"
    msg = str(err)
    assert msg and "\n" not in msg, f"message is not one line: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def push_image(client: RegistryClient, repo: str, tmp_path: Path, *, media: str = "oci", tag: str | None = "1", seed: int = 0, layers: int = 2):
    """Upload a config and *layers* random layer blobs, put a manifest; returns (raw, media_type, digest, blobs)."""
    blobs = {}
    layer_descs = []
    for i in range(layers):
        data = data_of(1000 + 777 * i, seed * 100 + i)
        d, n, p = blob_file(tmp_path, data)
        client.upload_blob(repo, d, p, n)
        blobs[d] = data
        mt = oci.DOCKER_LAYER_GZIP if media == "docker" else oci.OCI_LAYER_GZIP
        layer_descs.append({"mediaType": mt, "digest": d, "size": n})
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(b"x%d" % i) for i in range(layers)]}, "seed": seed}).encode()
    cd, cn, cp = blob_file(tmp_path, config)
    client.upload_blob(repo, cd, cp, cn)
    blobs[cd] = config
    manifest_type = oci.DOCKER_MANIFEST if media == "docker" else oci.OCI_MANIFEST
    config_type = oci.DOCKER_CONFIG if media == "docker" else oci.OCI_CONFIG
    raw = oci.canonical_json({"schemaVersion": 2, "mediaType": manifest_type, "config": {"mediaType": config_type, "digest": cd, "size": cn}, "layers": layer_descs})
    digest = client.put_manifest(repo, tag or sha(raw), raw, manifest_type)
    return raw, manifest_type, digest, blobs


@pytest.fixture
def client(registry):
    with RegistryClient(registry.host) as c:
        yield c


@pytest.fixture
def proxied(fault_proxy):
    """A client talking to the registry through the fault proxy."""
    with RegistryClient(fault_proxy.host) as c:
        yield c


# -------------------------------------------------------------- pure parts


def test_scheme_rules():
    assert RegistryClient("127.0.0.1:5000").base_url == "http://127.0.0.1:5000"
    assert RegistryClient("localhost:5000").base_url == "http://localhost:5000"
    assert RegistryClient("[::1]:5000").base_url == "http://[::1]:5000"
    assert RegistryClient("registry.example.com").base_url == "https://registry.example.com"
    assert RegistryClient("docker.io").base_url == "https://registry-1.docker.io"
    assert RegistryClient("10.0.0.1:5000")._schemes == ("https",)
    assert RegistryClient("registry.example.com", tls_verify=False)._schemes == ("https", "http")
    assert is_local_host("127.0.0.2:80") and not is_local_host("127.example.com")


def test_local_client_still_verifies_https_elsewhere(tmp_path):
    """A local registry's client builds its HTTPS transport only on use (no CA bundle
    loaded for plain HTTP), and that transport verifies certificates: a token realm
    served with a self-signed certificate is refused."""
    import http.server
    import shutil
    import ssl
    import subprocess
    import threading

    import httpx

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with RegistryClient("127.0.0.1:5000") as client:
            lazy = client._client._mounts
            assert len(lazy) == 1 and next(iter(lazy.values()))._inner is None
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                client._client.get(f"https://127.0.0.1:{server.server_address[1]}/token")
            assert next(iter(lazy.values()))._inner is not None
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("creds", ["nocolon", ":pass", ""])
def test_bad_creds(creds):
    with pytest.raises(LayerfsError) as e:
        RegistryClient("127.0.0.1:1", creds=creds)
    check_error(e.value, InvalidOption, "--creds", "USER:PASS")


def test_bad_host():
    with pytest.raises(LayerfsError) as e:
        RegistryClient("bad host/x")
    check_error(e.value, InvalidOption, "bad host/x")


def test_parse_challenges():
    got = parse_challenges(['Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push"', 'Basic realm="x"'])
    assert got == [
        ("bearer", {"realm": "https://auth.example.com/token", "service": "registry.example.com", "scope": "repository:a/b:pull,push"}),
        ("basic", {"realm": "x"}),
    ]
    assert parse_challenges(["Bearer realm=http://h/t,service=s"]) == [("bearer", {"realm": "http://h/t", "service": "s"})]


def test_error_detail():
    body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {"Tag": "x"}}]}).encode()
    assert error_detail(body) == "MANIFEST_UNKNOWN: manifest unknown (Tag=x)"
    assert error_detail(b"<html>\n</html>") == ""


def _auth(user, password):
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_authfile_lookup(tmp_path, monkeypatch):
    f = tmp_path / "auth.json"
    f.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": _auth("hub", "h"),
        "reg.example.com:5000": _auth("plain", "p"),
        "reg.example.com:5000/team": _auth("team", "t"),
        "reg.example.com:5000/team/app": {"username": "app", "password": "a"},
        "helper.example.com": {},
    }}))
    assert credentials_from_authfile("docker.io", "library/busybox", f) == ("hub", "h")
    assert credentials_from_authfile("reg.example.com:5000", "other", f) == ("plain", "p")
    assert credentials_from_authfile("reg.example.com:5000", "team/x", f) == ("team", "t")
    assert credentials_from_authfile("reg.example.com:5000", "team/app", f) == ("app", "a")
    assert credentials_from_authfile("helper.example.com", "x", f) is None
    assert credentials_from_authfile("unknown.example.com", "x", f) is None

    # default locations, first file with an entry wins
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {"h.example.com": _auth("docker", "d")}}))
    monkeypatch.setenv("HOME", str(home))
    assert credentials_from_authfile("h.example.com", "r") == ("docker", "d")
    xdg = tmp_path / "run"
    (xdg / "containers").mkdir(parents=True)
    (xdg / "containers" / "auth.json").write_text(json.dumps({"auths": {"h.example.com": _auth("podman", "p")}}))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert credentials_from_authfile("h.example.com", "r") == ("podman", "p")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(f))
    assert credentials_from_authfile("h.example.com", "r") == ("podman", "p")  # not in the first file
    assert credentials_from_authfile("reg.example.com:5000", "r") == ("plain", "p")


def test_authfile_errors(tmp_path):
    with pytest.raises(LayerfsError) as e:
        credentials_from_authfile("h", "r", tmp_path / "missing.json")
    check_error(e.value, InvalidOption, "missing.json", "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LayerfsError) as e:
        credentials_from_authfile("h", "r", bad)
    check_error(e.value, InvalidOption, str(bad), "not JSON")
    bad.write_text(json.dumps({"auths": {"h": {"auth": "!!!"}}}))
    with pytest.raises(LayerfsError) as e:
        credentials_from_authfile("h", "r", bad)
    check_error(e.value, InvalidOption, str(bad), "base64")
    with pytest.raises(LayerfsError) as e:
        RegistryClient("127.0.0.1:1", authfile=tmp_path / "nope.json")
    check_error(e.value, InvalidOption, "nope.json")


# ------------------------------------------------------------------- blobs


def test_monolithic_upload_and_download(client, registry, tmp_path):
    data = data_of(3 * 1024 * 1024 + 17, 1)
    d, n, p = blob_file(tmp_path, data)
    assert not client.blob_exists("test/mono", d)
    seen = []
    client.upload_blob("test/mono", d, p, n, progress=seen.append)
    assert sum(seen) == n
    assert client.blob_exists("test/mono", d)
    out = client.download_blob("test/mono", d, n, tmp_path / "out")
    assert out.read_bytes() == data
    with client.blob_stream("test/mono", d, n) as f:
        assert f.read() == data
    # the registry's own storage holds it under its digest
    assert (registry.root / "docker/registry/v2/blobs/sha256" / d[7:9] / d[7:] / "data").read_bytes() == data


def test_chunked_upload(proxied, fault_proxy, tmp_path):
    data = data_of(2 * 1024 * 1024 + 5, 2)
    d, n, p = blob_file(tmp_path, data)
    proxied.upload_blob("test/chunked", d, p, n, chunked=True, chunk_size=1024 * 1024)
    assert fault_proxy.count("PATCH", "/v2/test/chunked/blobs/uploads/") == 3
    ranges = [h.get("Content-Range") for m, _, h in fault_proxy.requests if m == "PATCH"]
    assert ranges == ["0-1048575", "1048576-2097151", "2097152-2097156"]
    assert proxied.download_blob("test/chunked", d, n, tmp_path / "out").read_bytes() == data
    # an empty blob, chunked: no PATCH at all, just the closing PUT
    e, en, ep = blob_file(tmp_path, b"")
    proxied.upload_blob("test/chunked", e, ep, en, chunked=True)
    assert proxied.blob_exists("test/chunked", e)


def test_chunked_upload_relative_locations(registry_factory, tmp_path):
    reg = registry_factory("relative", relative_urls=True)
    data = data_of(300_000, 3)
    d, n, p = blob_file(tmp_path, data)
    with RegistryClient(reg.host) as c:
        c.upload_blob("test/rel", d, p, n, chunked=True, chunk_size=100_000)
        c.upload_blob("test/rel2", d, p, n)
        assert c.download_blob("test/rel", d, n, tmp_path / "o1").read_bytes() == data
        assert c.download_blob("test/rel2", d, n, tmp_path / "o2").read_bytes() == data


def test_upload_wrong_digest_is_refused(client, tmp_path):
    d, n, p = blob_file(tmp_path, b"real content")
    wrong = sha(b"something else")
    with pytest.raises(LayerfsError) as e:
        client.upload_blob("test/wrong", wrong, p, n)
    check_error(e.value, DigestMismatch, wrong, "test/wrong")
    assert not client.blob_exists("test/wrong", wrong)
    with pytest.raises(LayerfsError) as e:
        client.upload_blob("test/wrong", d, p, n + 1)
    check_error(e.value, DigestMismatch, d)


def test_destination_skips_blobs_the_registry_has(registry, fault_proxy, tmp_path):
    data = data_of(50_000, 4)
    d, n, p = blob_file(tmp_path, data)
    ref = parse(f"docker://{fault_proxy.host}/test/skip:1")
    with RegistryDestination(ref, chunked=True, chunk_size=20_000) as dest:
        assert not dest.has_blob(d)
        dest.put_blob(d, n, str(p))
        assert dest.uploaded == [d] and dest.skipped == []
        posts = fault_proxy.count("POST")
        dest.put_blob(d, n, str(p))
        assert dest.skipped == [d]
        assert fault_proxy.count("POST") == posts
    # a new destination asks the registry (HEAD) and skips too
    with RegistryDestination(ref) as dest:
        heads = fault_proxy.count("HEAD")
        dest.put_blob(d, n, str(p))
        assert dest.skipped == [d] and dest.uploaded == []
        assert fault_proxy.count("HEAD") == heads + 1
        assert fault_proxy.count("POST") == posts


def test_parallel_downloads_share_a_client(client, tmp_path):
    items = []
    for i in range(8):
        data = data_of(200_000 + i, 10 + i)
        d, n, p = blob_file(tmp_path, data)
        client.upload_blob("test/par", d, p, n)
        items.append((d, n, data))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda it: client.download_blob("test/par", it[0], it[1], tmp_path / f"dl-{it[0][7:15]}"), items))
    assert [o.read_bytes() for o in outs] == [it[2] for it in items]


def test_source_open_blob_into_content_store(registry, tmp_path):
    data = data_of(2_500_000, 5)
    d, n, p = blob_file(tmp_path, data)
    with RegistryClient(registry.host) as c:
        c.upload_blob("test/src", d, p, n)
    store = ContentStore(tmp_path / "cs")
    with RegistrySource(parse(f"docker://{registry.host}/test/src:1")) as src:
        with src.open_blob(d, n) as f:
            store.ingest(f, d, n)
    assert store.path(d).read_bytes() == data


# --------------------------------------------------------------- manifests


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_manifest_by_tag_and_digest(client, tmp_path, media):
    raw, mt, digest, _ = push_image(client, f"test/{media}", tmp_path, media=media)
    assert digest == sha(raw)
    got, got_type, got_digest = client.get_manifest(f"test/{media}", "1")
    assert (got, got_type, got_digest) == (raw, mt, digest)
    assert client.get_manifest(f"test/{media}", digest) == (raw, mt, digest)


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_index(client, tmp_path, media):
    repo = f"test/index-{media}"
    members = []
    for i, arch in enumerate(("amd64", "arm64")):
        raw, mt, digest, _ = push_image(client, repo, tmp_path, media=media, tag=None, seed=i)
        members.append({"mediaType": mt, "digest": digest, "size": len(raw), "platform": {"os": "linux", "architecture": arch}})
    index_type = oci.DOCKER_LIST if media == "docker" else oci.OCI_INDEX
    index = oci.canonical_json({"schemaVersion": 2, "mediaType": index_type, "manifests": members})
    client.put_manifest(repo, "multi", index, index_type)
    raw, mt, digest = client.get_manifest(repo, "multi")
    assert (raw, mt, digest) == (index, index_type, sha(index))
    parsed = oci.parse_manifest(raw, mt)
    chosen = oci.select_platform(parsed, "linux/arm64")
    member_raw, member_type, member_digest = client.get_manifest(repo, chosen.digest)
    assert member_digest == chosen.digest
    assert isinstance(oci.parse_manifest(member_raw, member_type), oci.Manifest)


def test_source_and_destination_round_trip(registry, tmp_path):
    ref = parse(f"docker://{registry.host}/app/round:v1")
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = data_of(70_000, 6)
    with RegistryDestination(ref) as dest:
        for data in (config, layer):
            d, n, p = blob_file(tmp_path, data)
            dest.put_blob(d, n, str(p))
        raw = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                                  "config": {"mediaType": oci.OCI_CONFIG, "digest": sha(config), "size": len(config)},
                                  "layers": [{"mediaType": oci.OCI_LAYER, "digest": sha(layer), "size": len(layer)}]})
        dest.put_manifest(raw, oci.OCI_MANIFEST)
        assert dest.manifest_digest == sha(raw)
    with RegistrySource(ref) as src:
        assert src.get_manifest() == (raw, oci.OCI_MANIFEST)
        assert src.manifest_digest == sha(raw)
        with src.open_blob(sha(layer), len(layer)) as f:
            assert f.read() == layer
    # by digest, through the reference
    by_digest = parse(f"docker://{registry.host}/app/round@{sha(raw)}")
    with RegistrySource(by_digest) as src:
        assert src.get_manifest()[0] == raw
    with RegistryDestination(parse(f"docker://{registry.host}/app/round@{sha(b'other')}")) as dest:
        with pytest.raises(LayerfsError) as e:
            dest.put_manifest(raw, oci.OCI_MANIFEST)
        check_error(e.value, DigestMismatch, sha(raw))


def test_not_a_registry_reference():
    with pytest.raises(LayerfsError) as e:
        RegistrySource(parse("oci:/tmp/x:1"))
    check_error(e.value, InvalidOption, "oci:/tmp/x")


def test_manifest_pointing_at_missing_blob_is_refused(client, tmp_path):
    missing = sha(b"never uploaded")
    raw = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                              "config": {"mediaType": oci.OCI_CONFIG, "digest": missing, "size": 14}, "layers": []})
    with pytest.raises(LayerfsError) as e:
        client.put_manifest("test/broken", "1", raw, oci.OCI_MANIFEST)
    check_error(e.value, RegistryError, "test/broken", "HTTP 400", "MANIFEST_BLOB_UNKNOWN")


def test_corrupted_manifest(proxied, fault_proxy, tmp_path):
    raw, _, digest, _ = push_image(proxied, "test/badmanifest", tmp_path)
    fault_proxy.set("corrupt", target="manifest")
    with pytest.raises(LayerfsError) as e:
        proxied.get_manifest("test/badmanifest", "1")
    check_error(e.value, DigestMismatch, "test/badmanifest", digest)
    with pytest.raises(LayerfsError) as e:
        proxied.get_manifest("test/badmanifest", digest)
    check_error(e.value, DigestMismatch, digest, "test/badmanifest")


# -------------------------------------------------------------- not found


def test_not_found(client, registry, tmp_path):
    with pytest.raises(LayerfsError) as e:
        client.get_manifest("test/nothing", "latest")
    check_error(e.value, NotFound, "image test/nothing:latest not found on " + registry.host)
    push_image(client, "test/some", tmp_path)
    with pytest.raises(LayerfsError) as e:
        client.get_manifest("test/some", "nosuchtag")
    check_error(e.value, NotFound, "test/some:nosuchtag", registry.host)
    absent = sha(b"absent")
    with pytest.raises(LayerfsError) as e:
        client.get_manifest("test/some", absent)
    check_error(e.value, NotFound, f"test/some@{absent}")
    with pytest.raises(LayerfsError) as e:
        client.download_blob("test/some", absent, 6, tmp_path / "x")
    check_error(e.value, NotFound, absent, "test/some")
    assert not (tmp_path / "x").exists()
    with pytest.raises(LayerfsError) as e:
        with RegistrySource(parse(f"docker://{registry.host}/test/some:1")) as src:
            src.open_blob(absent, 6)
    check_error(e.value, NotFound, absent)


def test_connection_refused(tmp_path):
    port = free_port()  # nothing listens there
    host = f"127.0.0.1:{port}"
    with RegistryClient(host) as c:
        for call in (lambda: c.get_manifest("test/x", "1"), lambda: c.blob_exists("test/x", sha(b"")),
                     lambda: c.download_blob("test/x", sha(b""), 0, tmp_path / "o")):
            with pytest.raises(LayerfsError) as e:
                call()
            check_error(e.value, RegistryError, f"cannot reach registry {host}")
    with pytest.raises(LayerfsError) as e:
        with RegistrySource(parse(f"docker://{host}/test/x:1")) as src:
            src.get_manifest()
    check_error(e.value, RegistryError, host)


# ------------------------------------------------------------- bad blobs


@pytest.fixture
def stored_blob(proxied, tmp_path):
    data = data_of(1_500_000, 7)
    d, n, p = blob_file(tmp_path, data)
    proxied.upload_blob("test/faults", d, p, n)
    return d, n, data


def test_corrupted_blob(proxied, fault_proxy, stored_blob, tmp_path):
    d, n, _ = stored_blob
    fault_proxy.set("corrupt")
    out = tmp_path / "out"
    with pytest.raises(LayerfsError) as e:
        proxied.download_blob("test/faults", d, n, out)
    check_error(e.value, DigestMismatch, d, "corrupted")
    assert not out.exists()
    # through the source: the caller's verification (ContentStore) catches it
    store = ContentStore(tmp_path / "cs")
    with RegistrySource(parse(f"docker://{fault_proxy.host}/test/faults:1")) as src:
        with pytest.raises(LayerfsError) as e:
            with src.open_blob(d, n) as f:
                store.ingest(f, d, n)
    check_error(e.value, DigestMismatch, d)
    assert not store.has(d)


def test_short_blob(proxied, fault_proxy, stored_blob, tmp_path):
    d, n, _ = stored_blob
    fault_proxy.set("short")
    with pytest.raises(LayerfsError) as e:
        proxied.download_blob("test/faults", d, n, tmp_path / "out")
    check_error(e.value, DigestMismatch, d, "truncated")
    # without a size to compare with, the digest check catches it
    with pytest.raises(LayerfsError) as e:
        proxied.download_blob("test/faults", d, None, tmp_path / "out")
    check_error(e.value, DigestMismatch, d)
    assert not (tmp_path / "out").exists()


def test_cut_blob_is_resumed(proxied, fault_proxy, stored_blob, tmp_path):
    d, n, data = stored_blob
    fault_proxy.set("cut", times=1)
    assert proxied.download_blob("test/faults", d, n, tmp_path / "out").read_bytes() == data
    ranges = [h.get("Range") for m, p, h in fault_proxy.requests if m == "GET" and d in p]
    assert ranges == [None, f"bytes={n // 2}-"]


def test_cut_blob_resumed_without_range_support(proxied, fault_proxy, stored_blob, tmp_path):
    d, n, data = stored_blob
    fault_proxy.set("cut", times=2, strip_range=True)
    assert proxied.download_blob("test/faults", d, n, tmp_path / "out").read_bytes() == data


def test_cut_blob_every_time(proxied, fault_proxy, stored_blob, tmp_path):
    d, n, _ = stored_blob
    fault_proxy.set("cut")
    with pytest.raises(LayerfsError) as e:
        proxied.download_blob("test/faults", d, n, tmp_path / "out")
    msg = check_error(e.value, (RegistryError, DigestMismatch), d)
    assert "test/faults" in msg
    assert fault_proxy.faults_done == 3  # the first try and two resumes
    assert not (tmp_path / "out").exists()


def test_blob_500(proxied, fault_proxy, stored_blob, tmp_path):
    d, n, _ = stored_blob
    fault_proxy.set("500")
    with pytest.raises(LayerfsError) as e:
        proxied.download_blob("test/faults", d, n, tmp_path / "out")
    msg = check_error(e.value, RegistryError, "HTTP 500", d, "injected failure")
    assert f"{fault_proxy.url}/v2/test/faults/blobs/{d}" in msg
    with pytest.raises(LayerfsError) as e:
        with RegistrySource(parse(f"docker://{fault_proxy.host}/test/faults:1")) as src:
            src.open_blob(d, n)
    check_error(e.value, RegistryError, "HTTP 500", d)
    # the fault gone, the same client works
    fault_proxy.set(None)
    assert proxied.download_blob("test/faults", d, n, tmp_path / "out").stat().st_size == n


def test_manifest_500(proxied, fault_proxy, tmp_path):
    push_image(proxied, "test/m500", tmp_path)
    fault_proxy.set("500", target="manifest")
    with pytest.raises(LayerfsError) as e:
        proxied.get_manifest("test/m500", "1")
    check_error(e.value, RegistryError, "HTTP 500", "/v2/test/m500/manifests/1")


# -------------------------------------------------------------------- auth


def test_basic_auth(registry_auth, tmp_path):
    host = registry_auth.host
    d, n, p = blob_file(tmp_path, data_of(40_000, 8))
    with RegistryClient(host) as anonymous:
        with pytest.raises(LayerfsError) as e:
            anonymous.get_manifest("test/private", "1")
        check_error(e.value, RegistryError, f"authentication required for {host}/test/private", "--creds USER:PASS")
        with pytest.raises(LayerfsError) as e:
            anonymous.upload_blob("test/private", d, p, n)
        check_error(e.value, RegistryError, f"{host}/test/private", "--creds")
    with RegistryClient(host, creds=f"{registry_auth.user}:wrong") as wrong:
        with pytest.raises(LayerfsError) as e:
            wrong.blob_exists("test/private", d)
        check_error(e.value, RegistryError, f"authentication denied for {host}/test/private", "--creds")
    with RegistryClient(host, creds=registry_auth.creds) as good:
        raw, mt, digest, _ = push_image(good, "test/private", tmp_path)
        good.upload_blob("test/private", d, p, n, chunked=True, chunk_size=10_000)
        assert good.get_manifest("test/private", "1") == (raw, mt, digest)
        assert good.download_blob("test/private", d, n, tmp_path / "o").stat().st_size == n


def test_credentials_from_auth_json(registry_auth, tmp_path, monkeypatch):
    host = registry_auth.host
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {host: _auth(registry_auth.user, registry_auth.password)}}))
    with RegistryClient(host, authfile=authfile) as c:
        raw, mt, digest, _ = push_image(c, "test/authfile", tmp_path)
    # the default location ($REGISTRY_AUTH_FILE), through the transport classes
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(authfile))
    with RegistrySource(parse(f"docker://{host}/test/authfile:1")) as src:
        assert src.get_manifest() == (raw, mt)
    # --creds wins over the file
    with RegistrySource(parse(f"docker://{host}/test/authfile:1"), creds=f"{registry_auth.user}:nope") as src:
        with pytest.raises(LayerfsError) as e:
            src.get_manifest()
        check_error(e.value, RegistryError, "authentication denied", "test/authfile")


def test_bearer_token_auth(registry_token, tmp_path):
    host, ts = registry_token.host, registry_token.token_server
    d, n, p = blob_file(tmp_path, data_of(30_000, 9))
    with RegistryClient(host, creds=registry_token.creds) as c:
        raw, mt, digest, blobs = push_image(c, "team/app", tmp_path)
        c.upload_blob("team/app", d, p, n, chunked=True, chunk_size=8_000)
        fetched = ts.requests[:]
        assert c.get_manifest("team/app", "1") == (raw, mt, digest)
        for bd, data in blobs.items():
            with c.blob_stream("team/app", bd, len(data)) as f:
                assert f.read() == data
        # one token for push (which covers pull); none fetched for the pulls
        assert len(fetched) == 1 and c.token_requests == 1
        assert fetched[0]["user"] == registry_token.user
        assert ts.requests == fetched
    # anonymous: the token server grants nothing on team/* -> a clear error
    with RegistryClient(host) as anon:
        with pytest.raises(LayerfsError) as e:
            anon.get_manifest("team/app", "1")
        check_error(e.value, RegistryError, f"authentication required for {host}/team/app", "--creds USER:PASS")
    # wrong password: the token server refuses
    with RegistryClient(host, creds=f"{registry_token.user}:wrong") as bad:
        with pytest.raises(LayerfsError) as e:
            bad.blob_exists("team/app", d)
        check_error(e.value, RegistryError, f"authentication denied for {host}/team/app", registry_token.user)


def test_bearer_anonymous_pull(registry_token, tmp_path):
    host = registry_token.host
    with RegistryClient(host, creds=registry_token.creds) as c:
        raw, mt, digest, _ = push_image(c, "public/tool", tmp_path)
    with RegistrySource(parse(f"docker://{host}/public/tool:1")) as src:
        assert src.get_manifest() == (raw, mt)
    with RegistryDestination(parse(f"docker://{host}/public/tool:2")) as dest:
        with pytest.raises(LayerfsError) as e:
            dest.put_manifest(raw, mt)  # anonymous may pull, not push
        check_error(e.value, RegistryError, f"{host}/public/tool", "--creds")


def test_blob_redirect_is_followed_without_credentials(registry, registry_auth, tmp_path):
    """A 307 to another origin (object storage) is followed; the registry's
    credentials are not sent there."""
    from .conftest import FaultProxy

    data = data_of(120_000, 11)
    d, n, p = blob_file(tmp_path, data)
    with RegistryClient(registry.host) as c:
        c.upload_blob("test/redir", d, p, n)  # the "storage" side has it
    front, storage = FaultProxy(registry_auth.port), FaultProxy(registry.port)
    try:
        front.set("redirect")
        front.redirect_port = storage.port
        with RegistryClient(front.host, creds=registry_auth.creds) as c:
            c.upload_blob("test/redir", d, p, n)
            assert c.download_blob("test/redir", d, n, tmp_path / "out").read_bytes() == data
            with c.blob_stream("test/redir", d, n) as f:
                assert f.read() == data
        assert front.faults_done == 2
        gets = [h for m, path, h in storage.requests if m == "GET" and d in path]
        assert len(gets) == 2 and not any("Authorization" in h for h in gets)
        assert any("Authorization" in h for m, path, h in front.requests if m == "GET" and d in path)
    finally:
        front.stop()
        storage.stop()


def test_anonymous_auth_message_says_what_to_do(registry_auth):
    with RegistryClient(registry_auth.host) as c:
        with pytest.raises(LayerfsError) as e:
            c.get_manifest("test/x", "1")
    msg = check_error(e.value, RegistryError, f"{registry_auth.host}/test/x", "HTTP 401", "UNAUTHORIZED")
    assert "pass --creds USER:PASS or log in" in msg
