"""Pull and push through a real registry (Debian's docker-registry), incl. auth and faults."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

import layerfs
from layerfs import _mountapi, errors
from layerfs.engine.images import ImageStore
from layerfs.engine.pull import PullOptions, pull
from layerfs.engine.push import commit_image, push

from .imagebuild import expected_tree, tree_of, write_layout
from .test_pull_local import _rootfs, _snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for overlay mounts")


def _seed(images, tmp_path, host: str, repo: str = "test/app:1", **push_args) -> None:
    """Put the test image into the registry with layerfs itself (pull from a layout, push)."""
    built = write_layout(tmp_path / "seed-layout")
    with layerfs.open_store(tmp_path / "seed-store") as seed_store:
        seed = ImageStore(seed_store)
        pull(seed, f"oci:{built.layout}:v1", "seed:1")
        push(seed, "seed:1", f"docker://{host}/{repo}", **push_args)


@pytest.mark.parametrize("compression, chunked", [("gzip", False), ("zstd", True)])
def test_push_then_pull_from_registry(images, tmp_path, registry, compression, chunked):
    _seed(images, tmp_path, registry.host, compression=compression, chunked=chunked)
    events = []
    image = pull(images, f"docker://{registry.host}/test/app:1", progress=events.append)
    assert image.name == f"{registry.host}/test/app:1"
    assert _rootfs(images, image.name) == expected_tree()
    statuses = {e["status"] for e in events if e["event"] == "layer"}
    assert {"downloading", "downloaded", "applying"} <= statuses
    # Pulled blobs are kept: pushing again re-uses them byte for byte.
    digest = push(images, image.name, f"docker://{registry.host}/test/copy:1", compression=compression)
    assert digest == image.manifest_digest


def test_second_pull_downloads_nothing(images, tmp_path, registry):
    _seed(images, tmp_path, registry.host)
    pull(images, f"docker://{registry.host}/test/app:1", "a:1")
    events = []
    pull(images, f"docker://{registry.host}/test/app:1", "b:1", progress=events.append)
    assert {e["status"] for e in events if e["event"] == "layer"} == {"exists"}


def test_images_pushed_by_skopeo(images, tmp_path, registry):
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    built = write_layout(tmp_path / "layout", compressions=("gzip", "none"))
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{built.layout}:v1", f"docker://{registry.host}/sk/app:3"],
        check=True, capture_output=True,
    )
    image = pull(images, f"docker://{registry.host}/sk/app:3")
    assert _rootfs(images, image.name) == expected_tree()


def test_round_trip_through_the_registry(images, tmp_path, registry):
    built = write_layout(tmp_path / "layout")
    pull(images, f"oci:{built.layout}:v1", "base:1")
    store = images.store
    store.create_container("work", images.image("base:1").top_chain)
    root = store.mount("work")
    (root / "etc/motd").write_text("round trip\n")
    shutil.rmtree(root / "data")
    (root / "newdir").mkdir()
    (root / "newdir/file").write_bytes(os.urandom(100_000))
    expected = tree_of(root)
    store.unmount("work")
    commit_image(images, "work", "app:2")
    push(images, "app:2", f"docker://{registry.host}/rt/app:2", chunked=True)
    with layerfs.open_store(tmp_path / "second") as other_store:
        other = ImageStore(other_store)
        pulled = pull(other, f"docker://{registry.host}/rt/app:2")
        assert _rootfs(other, pulled.name) == expected
        for point in _mountapi.mounts_under(str(tmp_path / "second")):
            _mountapi.umount(point, _mountapi.MNT_DETACH)


def test_auth(images, tmp_path, registry_auth):
    creds = f"{registry_auth.user}:{registry_auth.password}"
    _seed(images, tmp_path, registry_auth.host, opts=PullOptions(creds=creds))
    with pytest.raises(errors.LayerfsError) as info:
        pull(images, f"docker://{registry_auth.host}/test/app:1")
    assert "auth" in str(info.value).lower() and "\n" not in str(info.value)
    image = pull(images, f"docker://{registry_auth.host}/test/app:1", opts=PullOptions(creds=creds))
    assert _rootfs(images, image.name) == expected_tree()
    authfile = tmp_path / "auth.json"
    import base64

    authfile.write_text(json.dumps({"auths": {registry_auth.host: {"auth": base64.b64encode(creds.encode()).decode()}}}))
    pull(images, f"docker://{registry_auth.host}/test/app:1", "via-file:1", PullOptions(authfile=str(authfile)))


@pytest.mark.parametrize("fault", ["500", "cut", "corrupt", "short"])
def test_registry_faults_leave_the_store_unchanged(images, tmp_path, registry, fault_proxy, fault):
    _seed(images, tmp_path, registry.host)
    before = _snapshot(images)
    fault_proxy.fault = fault
    fault_proxy.target = "blob"
    with pytest.raises(errors.LayerfsError) as info:
        pull(images, f"docker://{fault_proxy.host}/test/app:1")
    message = str(info.value)
    assert "\n" not in message and ("sha256:" in message or "500" in message)
    after = _snapshot(images)
    assert after[:3] == before[:3]
    # Verified blobs may stay as a download cache; a half-written one may not.
    assert not [p for p in after[3] if ".ingest-" in p]
    assert images.store.driver.ids() == set()
    assert images.store.check() == []


@pytest.mark.parametrize("fault", ["500", "cut", "corrupt", "short"])
def test_layer_blob_faults_leave_the_store_unchanged(images, tmp_path, registry, fault_proxy, fault):
    """The config passes; the layer blobs fail while they are being applied."""
    _seed(images, tmp_path, registry.host)
    before = _snapshot(images)
    fault_proxy.set(fault, target="blob", skip=1)
    with pytest.raises(errors.LayerfsError) as info:
        pull(images, f"docker://{fault_proxy.host}/test/app:1")
    message = str(info.value)
    assert "\n" not in message and ("sha256:" in message or "500" in message), message
    after = _snapshot(images)
    assert after[:3] == before[:3]
    assert not [p for p in after[3] if ".ingest-" in p]
    assert images.store.driver.ids() == set()
    assert images.store.check() == []


def test_missing_image_and_unreachable_registry(images, registry):
    with pytest.raises(errors.NotFound, match="nosuch"):
        pull(images, f"docker://{registry.host}/nosuch/app:1")
    with pytest.raises(errors.LayerfsError, match="127.0.0.1:9"):
        pull(images, "docker://127.0.0.1:9/app:1")
    assert images.images() == []


def test_cli_pull_push(tmp_path, registry):
    built = write_layout(tmp_path / "layout")
    root = tmp_path / "cli"

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    run("pull", f"oci:{built.layout}:v1", "app:1")
    digest = run("push", "app:1", f"docker://{registry.host}/cli/app:1", "--compress", "zstd").strip()
    assert digest.startswith("sha256:")
    events = [json.loads(l) for l in run("--json", "pull", f"docker://{registry.host}/cli/app:1", "again:1").splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["image"] == "again:1"


def test_layers_are_applied_while_they_download(images, tmp_path, registry, fault_proxy):
    """The proxy holds every layer blob at half its body: the apply must already be
    reading it (no waiting for whole downloads), and finish once the rest arrives."""
    _seed(images, tmp_path, registry.host)
    fault_proxy.set("hold", target="blob")
    events: list[dict] = []
    applying = threading.Event()
    lock = threading.Lock()

    def record(event: dict) -> None:
        with lock:
            events.append(event)
            by_status = {(e.get("digest"), e.get("status")) for e in events}
            # A layer is being applied while its download is still unfinished
            # (small blobs, under 4 KiB, are not held and may be done already).
            if any(s == "applying" and (d, "downloaded") not in by_status for d, s in by_status):
                applying.set()

    outcome: list = []
    worker = threading.Thread(
        target=lambda: outcome.append(_pull_or_error(images, f"docker://{fault_proxy.host}/test/app:1", record))
    )
    worker.start()
    try:
        assert applying.wait(30), "no layer started applying while its blob was half downloaded"
    finally:
        fault_proxy.release.set()
        worker.join(60)
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    assert _rootfs(images, outcome[0].name) == expected_tree()
    assert not [p for p in _snapshot(images)[3] if ".ingest-" in p]


def _pull_or_error(images, ref, progress):
    try:
        return pull(images, ref, progress=progress)
    except BaseException as exc:  # handed to the test thread
        return exc
