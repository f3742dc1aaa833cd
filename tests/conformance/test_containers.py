"""Containers (writable layers): names, mounts and their reference counts,
removal, persistence, and the store-wide operations (status, check, gc,
options, reopening)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

import layerfs
from layerfs import errors

from conformance import (chain_ids_of, container_names, files_containing, mounted,
                         register_bytes)
from conftest import mounts_under
from tarbuild import LayerTar


def _image(store):
    return register_bytes(store, (LayerTar()
                                  .dir("etc")
                                  .file("etc/os-release", b"ID=test\n")
                                  .dir("var")
                                  .dir("var/log")
                                  .bytes()))


def test_create_container_on_layer(store):
    img = _image(store)
    ctr = store.create_container("web", img.chain_id)
    assert (ctr.name, ctr.parent) == ("web", img.chain_id)
    got = store.container("web")
    assert (got.name, got.parent) == ("web", img.chain_id)
    assert container_names(store) == {"web"}
    with mounted(store, "web") as mp:
        assert (mp / "etc/os-release").read_bytes() == b"ID=test\n"


def test_create_container_from_scratch(store):
    ctr = store.create_container("scratch-ctr", None)
    assert ctr.parent is None
    with mounted(store, "scratch-ctr") as mp:
        assert [n for n in os.listdir(mp) if n != "lost+found"] == []


def test_create_container_unknown_parent(store):
    with pytest.raises(errors.NotFound):
        store.create_container("c", "sha256:" + "1" * 64)
    assert store.containers() == []


def test_container_names_are_unique(store):
    img = _image(store)
    store.create_container("dup", img.chain_id)
    with pytest.raises(errors.AlreadyExists):
        store.create_container("dup", None)
    with pytest.raises(errors.AlreadyExists):
        store.create_container("dup", img.chain_id)
    assert [c.name for c in store.containers()] == ["dup"]
    assert store.container("dup").parent == img.chain_id


def test_unknown_container_is_not_found(store):
    with pytest.raises(errors.NotFound):
        store.container("nope")
    with pytest.raises(errors.NotFound):
        store.remove_container("nope")
    with pytest.raises(errors.NotFound):
        store.mount("nope")
    with pytest.raises(errors.NotFound):
        store.changes("nope")
    with pytest.raises(errors.NotFound):
        store.commit("nope")


def test_writes_persist_across_mounts(store):
    img = _image(store)
    store.create_container("c", img.chain_id)
    with mounted(store, "c") as mp:
        (mp / "var/log/app.log").write_bytes(b"line 1\n")
        os.unlink(mp / "etc/os-release")
    with mounted(store, "c") as mp:
        assert (mp / "var/log/app.log").read_bytes() == b"line 1\n"
        assert not (mp / "etc/os-release").exists()
    # the image itself is untouched
    with mounted(store, img.chain_id) as mp:
        assert (mp / "etc/os-release").exists()
        assert not (mp / "var/log/app.log").exists()


def test_containers_are_isolated(store):
    img = _image(store)
    store.create_container("a", img.chain_id)
    store.create_container("b", img.chain_id)
    with mounted(store, "a") as ma, mounted(store, "b") as mb:
        assert ma != mb
        (ma / "etc/os-release").write_bytes(b"ID=a\n")
        (mb / "only-b").write_bytes(b"b")
        assert (mb / "etc/os-release").read_bytes() == b"ID=test\n"
        assert not (ma / "only-b").exists()


def test_mount_is_reference_counted(store):
    img = _image(store)
    store.create_container("c", img.chain_id)
    p1 = store.mount("c")
    p2 = store.mount("c")
    assert p1 == p2
    assert os.path.ismount(p1)
    store.unmount("c")
    assert os.path.ismount(p1), "unmounted while a reference was still held"
    (p1 / "still-there").write_bytes(b"yes")
    store.unmount("c")
    assert not os.path.ismount(p1)
    assert mounts_under(p1) == []


def test_view_mount_is_reference_counted(store):
    img = _image(store)
    p1 = store.mount(img.chain_id)
    p2 = store.mount(img.chain_id)
    assert p1 == p2 and os.path.ismount(p1)
    store.unmount(img.chain_id)
    assert (p1 / "etc/os-release").read_bytes() == b"ID=test\n"
    store.unmount(img.chain_id)
    assert not os.path.ismount(p1)


def test_mount_returns_a_path(store):
    img = _image(store)
    store.create_container("c", img.chain_id)
    p = store.mount("c")
    try:
        assert isinstance(p, os.PathLike) and p.is_absolute() and p.is_dir()
    finally:
        store.unmount("c")


def test_view_is_read_only(store):
    img = _image(store)
    with mounted(store, img.chain_id) as mp:
        with pytest.raises(OSError) as ei:
            (mp / "testfile").write_bytes(b"testcontent")
        assert ei.value.errno == errno.EROFS
        with pytest.raises(OSError) as ei:
            os.mkdir(mp / "var/newdir")
        assert ei.value.errno == errno.EROFS


def test_root_permission_0755(store):
    store.create_container("c", None)
    with mounted(store, "c") as mp:
        st = os.stat(mp)
        assert stat.S_IMODE(st.st_mode) == 0o755
        assert (st.st_uid, st.st_gid) == (0, 0)
    img = _image(store)
    store.create_container("d", img.chain_id)
    with mounted(store, "d") as mp:
        assert stat.S_IMODE(os.stat(mp).st_mode) == 0o755


def test_remove_mounted_container_is_in_use(store):
    img = _image(store)
    store.create_container("busy", img.chain_id)
    p = store.mount("busy")
    with pytest.raises(errors.InUse):
        store.remove_container("busy")
    assert container_names(store) == {"busy"}
    assert os.path.ismount(p)
    store.unmount("busy")
    store.remove_container("busy")
    assert store.containers() == []
    with pytest.raises(errors.NotFound):
        store.container("busy")


def test_remove_twice_mounted_container_is_in_use_until_last_unmount(store):
    store.create_container("busy", None)
    store.mount("busy")
    store.mount("busy")
    store.unmount("busy")
    with pytest.raises(errors.InUse):
        store.remove_container("busy")
    store.unmount("busy")
    store.remove_container("busy")
    assert store.containers() == []


def test_force_remove_mounted_container(store, store_root):
    img = _image(store)
    store.create_container("forced", img.chain_id)
    store.mount("forced")
    store.remove_container("forced", force=True)
    assert store.containers() == []
    assert mounts_under(store_root) == []
    store.release(img.chain_id)  # nothing references the image any more
    assert store.layers() == []


def test_remove_then_reuse_name(store, store_root):
    img = _image(store)
    marker = b"reuse-marker-" + os.urandom(8).hex().encode()
    store.create_container("reuse-1", img.chain_id)
    with mounted(store, "reuse-1") as mp:
        (mp / "data").write_bytes(marker)
    store.remove_container("reuse-1")
    # same name, other parent: a brand new, empty writable layer
    ctr = store.create_container("reuse-1", None)
    assert ctr.parent is None
    with mounted(store, "reuse-1") as mp:
        assert [n for n in os.listdir(mp) if n != "lost+found"] == []
    store.gc()
    assert files_containing(store_root, marker) == []
    layer = store.commit("reuse-1")
    assert layer.parent is None
    store.remove_container("reuse-1")
    store.release(img.chain_id)
    assert chain_ids_of(store.layers()) == {layer.chain_id}


def test_removed_container_files_are_reclaimed(store, store_root):
    marker = b"container-marker-" + os.urandom(8).hex().encode()
    store.create_container("c", None)
    with mounted(store, "c") as mp:
        (mp / "f").write_bytes(marker)
    assert files_containing(store_root, marker)
    store.remove_container("c")
    store.gc()
    assert files_containing(store_root, marker) == []
    assert store.check() == []


def test_commit_keeps_container(store):
    img = _image(store)
    store.create_container("c", img.chain_id)
    with mounted(store, "c") as mp:
        (mp / "new").write_bytes(b"n")
    layer = store.commit("c")
    assert layer.parent == img.chain_id
    assert store.container("c").parent == img.chain_id
    assert chain_ids_of(store.layers()) == {img.chain_id, layer.chain_id}
    with mounted(store, "c") as mp:
        assert (mp / "new").read_bytes() == b"n"
        (mp / "after-commit").write_bytes(b"a")
    with mounted(store, layer.chain_id) as mp:
        assert (mp / "new").read_bytes() == b"n"
        assert not (mp / "after-commit").exists()
    # the committed layer outlives its container
    store.remove_container("c")
    with mounted(store, layer.chain_id) as mp:
        assert (mp / "etc/os-release").exists() and (mp / "new").exists()
    # and it is a child of the image
    with pytest.raises(errors.InUse):
        store.release(img.chain_id)


def test_status_names_driver(store, driver_name):
    st = store.status()
    assert isinstance(st, dict)
    assert st["driver"] == driver_name


def test_check_healthy_store(store):
    assert store.check() == []
    img = _image(store)
    store.create_container("c", img.chain_id)
    with mounted(store, "c") as mp:
        (mp / "x").write_bytes(b"x")
        assert store.check() == []
    store.commit("c")
    assert store.check() == []
    assert store.check(repair=True) == []


def test_close_twice(store_root, driver_name):
    from conftest import open_store_or_skip
    s = open_store_or_skip(store_root, driver_name)
    s.create_container("c", None)
    s.close()
    s.close()


def test_context_manager(store_root, driver_name):
    from conftest import open_store_or_skip
    with open_store_or_skip(store_root, driver_name) as s:
        s.create_container("c", None)
    with layerfs.open_store(store_root, driver=driver_name) as s:
        assert container_names(s) == {"c"}


def test_containers_survive_reopen(store, store_root, driver_name):
    img = _image(store)
    store.create_container("c", img.chain_id)
    with mounted(store, "c") as mp:
        (mp / "kept").write_bytes(b"k")
    store.close()
    with layerfs.open_store(store_root, driver=driver_name) as s2:
        assert s2.container("c").parent == img.chain_id
        with mounted(s2, "c") as mp:
            assert (mp / "kept").read_bytes() == b"k"
            assert (mp / "etc/os-release").exists()


def test_auto_driver_keeps_existing_driver(store, store_root, driver_name):
    _image(store)
    store.close()
    with layerfs.open_store(store_root, driver="auto") as s2:
        assert s2.status()["driver"] == driver_name
        assert len(s2.layers()) == 1


def test_auto_driver_on_fresh_root_is_overlay2(tmp_path):
    from conftest import open_store_or_skip
    root = tmp_path / "fresh"
    root.mkdir()
    s = open_store_or_skip(root, "auto")
    try:
        assert s.status()["driver"] == "overlay2"
    finally:
        s.close()


def test_unknown_option_is_invalid_option(store_root, driver_name):
    if os.geteuid() != 0:
        pytest.skip("layerfs stores need root")
    with pytest.raises(errors.InvalidOption) as ei:
        layerfs.open_store(store_root, driver=driver_name,
                           options={"bogus.frobnicate": "1"})
    assert "bogus.frobnicate" in str(ei.value)
