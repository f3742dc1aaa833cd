"""Pull and push through local transports, checked against images built by hand and by skopeo/umoci."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import layerfs
from layerfs import _mountapi, errors
from layerfs.engine.images import ImageStore
from layerfs.engine.pull import pull
from layerfs.engine.push import commit_image, push

from .imagebuild import config_for, expected_tree, layers, tree_of, write_layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for overlay mounts")


def _rootfs(images: ImageStore, name: str) -> dict[str, str]:
    top = images.image(name).top_chain
    root = images.store.mount(top)
    try:
        return tree_of(root)
    finally:
        images.store.unmount(top)


def _snapshot(images: ImageStore):
    store = images.store
    listing = sorted(
        str(p.relative_to(store.root)) for p in store.root.rglob("*") if "probes" not in p.name and not p.name.startswith("layerfs.db")
    )
    return (
        [(l.chain_id, l.refs) for l in store.layers()],
        [c.name for c in store.containers()],
        [(i.name, i.manifest_digest) for i in images.images()],
        listing,
    )


def test_pull_oci_layout_flattens_whiteouts_and_opaque_dirs(images, tmp_path):
    built = write_layout(tmp_path / "layout")
    events = []
    image = pull(images, f"oci:{built.layout}:v1", progress=events.append)
    assert image.name == "layout:v1"
    assert image.config.diff_ids == built.diff_ids
    assert _rootfs(images, "layout:v1") == expected_tree()
    assert [l.chain_id for l in images.store.layers()] == list(image.chain)
    assert events[-1]["event"] == "done"


def test_umoci_unpack_agrees(images, tmp_path):
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed")
    built = write_layout(tmp_path / "layout", compressions=("gzip", "none"))  # umoci 0.4 has no zstd
    pull(images, f"oci:{built.layout}:v1", "app:1")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{built.layout}:v1", str(bundle)], check=True, capture_output=True)
    assert _rootfs(images, "app:1") == tree_of(bundle / "rootfs")


@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive", "oci"])
def test_images_written_by_skopeo(images, tmp_path, transport):
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    built = write_layout(tmp_path / "layout", compressions=("gzip", "none"))  # skopeo 1.9 cannot write zstd to docker-archive
    target = tmp_path / ("copy" if transport == "oci" else "copy.tar")
    dest = f"{transport}:{target}:" + ("example/app:2" if transport == "docker-archive" else "v2")
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{built.layout}:v1", dest], check=True, capture_output=True)
    source = f"{transport}:{target}" + ("" if transport == "docker-archive" else ":v2")
    image = pull(images, source)
    assert _rootfs(images, image.name) == expected_tree()
    if transport == "docker-archive":
        assert image.name == "example/app:2"


def test_layers_already_stored_are_not_applied_again(images, tmp_path):
    built = write_layout(tmp_path / "layout")
    pull(images, f"oci:{built.layout}:v1", "a:1")
    dirs = images.store.driver.ids()
    events = []
    pull(images, f"oci:{built.layout}:v1", "b:1", progress=events.append)
    assert images.store.driver.ids() == dirs
    assert {e["status"] for e in events if e["event"] == "layer"} == {"exists"}
    assert [l.refs for l in images.store.layers()] == [2, 2, 2]
    images.remove("a:1")
    assert [l.refs for l in images.store.layers()] == [1, 1, 1]
    images.remove("b:1")
    assert images.store.layers() == []
    assert images.store.check() == []


def _corrupt_layer(built, index: int) -> None:
    path = built.layout / "blobs" / "sha256" / built.layer_digests[index].split(":", 1)[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_manifest(built, mutate) -> None:
    """Change the manifest (or config) of a built layout and re-point index.json."""
    blobs = built.layout / "blobs" / "sha256"
    manifest = json.loads((blobs / built.manifest_digest.split(":", 1)[1]).read_bytes())
    mutate(manifest, blobs)
    raw = json.dumps(manifest).encode()
    digest = hashlib.sha256(raw).hexdigest()
    (blobs / digest).write_bytes(raw)
    index = json.loads((built.layout / "index.json").read_text())
    index["manifests"][0].update(digest="sha256:" + digest, size=len(raw))
    (built.layout / "index.json").write_text(json.dumps(index))


def _bad_config(manifest, blobs):
    config = json.loads(config_for(["sha256:" + "1" * 64] * len(manifest["layers"])))
    raw = json.dumps(config).encode()
    digest = hashlib.sha256(raw).hexdigest()
    (blobs / digest).write_bytes(raw)
    manifest["config"].update(digest="sha256:" + digest, size=len(raw))


def _missing_blob(manifest, blobs):
    manifest["layers"][1]["digest"] = "sha256:" + "2" * 64


def _not_a_manifest(manifest, blobs):
    manifest.clear()
    manifest["hello"] = "world"


@pytest.mark.parametrize(
    "damage, error, words",
    [
        (lambda b: _corrupt_layer(b, 2), errors.LayerfsError, ["sha256:"]),
        (lambda b: _corrupt_layer(b, 0), errors.LayerfsError, ["sha256:"]),
        (lambda b: _rewrite_manifest(b, _bad_config), errors.DigestMismatch, ["diff id"]),
        (lambda b: _rewrite_manifest(b, _missing_blob), errors.NotFound, ["sha256:" + "2" * 64]),
        (lambda b: _rewrite_manifest(b, _not_a_manifest), errors.InvalidLayer, ["manifest"]),
    ],
    ids=["corrupt-top-layer", "corrupt-base-layer", "wrong-diff-id", "missing-blob", "malformed-manifest"],
)
def test_bad_images_leave_the_store_unchanged(images, tmp_path, damage, error, words):
    good = write_layout(tmp_path / "good")
    pull(images, f"oci:{good.layout}:v1", "keep:1")  # something already in the store
    bad = write_layout(tmp_path / "bad", tars=layers(salt="bad"), compressions=("none", "gzip", "zstd"))
    damage(bad)
    before = _snapshot(images)
    with pytest.raises(error) as info:
        pull(images, f"oci:{bad.layout}:v1", "bad:1")
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert _snapshot(images) == before
    assert images.store.check() == []


def test_a_layer_with_path_traversal_is_refused(images, tmp_path):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("../../etc/evil")
        ti.size = 4
        tf.addfile(ti, io.BytesIO(b"evil"))
    built = write_layout(tmp_path / "evil", tars=layers()[:1] + [buf.getvalue()])
    before = _snapshot(images)
    with pytest.raises(errors.InvalidLayer, match=r"\.\./\.\./etc/evil"):
        pull(images, f"oci:{built.layout}:v1")
    assert _snapshot(images) == before
    assert not Path("/etc/evil").exists()


# docker-archive layers are always written uncompressed: one compression is enough there.
@pytest.mark.parametrize(
    "transport, compression",
    [("oci", "gzip"), ("oci", "zstd"), ("oci-archive", "gzip"), ("oci-archive", "zstd"), ("oci-archive", "none"),
     ("docker-archive", "gzip"), ("docker-archive", "none")],
)
def test_commit_push_pull_round_trip(images, tmp_path, transport, compression):
    built = write_layout(tmp_path / "layout")
    pull(images, f"oci:{built.layout}:v1", "base:1")
    store = images.store
    store.create_container("work", images.image("base:1").top_chain)
    root = store.mount("work")
    (root / "etc/motd").write_text("changed\n")
    (root / "opt/app/VERSION").unlink()
    (root / "srv").mkdir()
    (root / "srv/index.html").write_text("<h1>hi</h1>\n")
    expected = tree_of(root)
    store.unmount("work")
    image = commit_image(images, "work", "app:2", message="test")
    assert image.config.diff_ids[:3] == built.diff_ids and len(image.chain) == 4
    assert image.config.doc["history"][-1]["comment"] == "test"
    assert _rootfs(images, "app:2") == expected

    target = tmp_path / ("out" if transport == "oci" else "out.tar")
    dest = f"{transport}:{target}" + ("" if transport == "docker-archive" else ":app2")
    push(images, "app:2", dest, compression=compression)
    with layerfs.open_store(tmp_path / "second") as second_store:
        second = ImageStore(second_store)
        pulled = pull(second, dest if transport != "docker-archive" else f"docker-archive:{target}")
        assert _rootfs(second, pulled.name) == expected
        for point in _mountapi.mounts_under(str(tmp_path / "second")):
            _mountapi.umount(point, _mountapi.MNT_DETACH)
    if shutil.which("skopeo") and transport != "docker-archive":
        # A client nobody here wrote can read what we pushed.
        out = subprocess.run(["skopeo", "inspect", dest], check=True, capture_output=True, text=True).stdout
        assert len(json.loads(out)["Layers"]) == 4


def test_engine_cli(tmp_path):
    built = write_layout(tmp_path / "layout")
    root = tmp_path / "cli"

    def run(*args, ok=True):
        proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), *args], capture_output=True, text=True)
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    assert run("pull", f"oci:{built.layout}:v1", "app:1").stdout.strip() == "app:1"
    events = [json.loads(line) for line in run("--json", "pull", f"oci:{built.layout}:v1", "app:2").stdout.splitlines()]
    assert events[-1] == {"event": "done", "image": "app:2", "id": built.config_digest}
    listed = json.loads(run("--json", "images").stdout)
    assert sorted(i["name"] for i in listed) == ["app:1", "app:2"]
    config = json.loads(run("image", "inspect", "app:1").stdout)
    assert config["rootfs"]["diff_ids"] == built.diff_ids
    proc = run("pull", f"oci:{built.layout}:nosuch", ok=False)
    assert proc.returncode == 1 and "nosuch" in proc.stderr and "Traceback" not in proc.stderr
    assert run("rmi", "app:1", "app:2").stdout.split() == ["app:1", "app:2"]
    assert json.loads(run("--json", "layer", "ls").stdout) == []
