"""Behaviours of containerd's core/snapshots/testsuite, on the layerfs API.

A containerd "active" snapshot is a container here, Commit is commit(), a
"view" is mounting a chain id (read-only), Remove is remove_container() or
release().  ``check_snapshots`` (see conformance/__init__.py) is the port of
containerd's checkSnapshots: every applier is applied both to a container and
to a flat reference directory, committed, and the views are compared.
"""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from layerfs import errors

from conformance import (apply_ops, assert_same_tree, chain_ids_of, check_snapshots, chown,
                         create_dir, create_file, link, mounted, remove_all, rename)


def test_basic(store, work_dir):
    initial = [
        create_file("/foo", b"foo\n", 0o777),
        create_dir("/a", 0o755),
        create_dir("/a/b", 0o755),
        create_dir("/a/b/c", 0o755),
    ]
    diff = [
        create_file("/bar", b"bar\n", 0o777),
        create_file("/foo", b"bar\n", 0o777),   # change content of foo
        remove_all("/a/b"),
    ]
    flat_initial = work_dir / "flat-initial"
    flat_initial.mkdir()
    apply_ops(flat_initial, initial)
    flat_both = work_dir / "flat-both"
    flat_both.mkdir()
    apply_ops(flat_both, initial + diff)

    store.create_container("preparing", None)
    with mounted(store, "preparing") as mp:
        apply_ops(mp, initial)
    committed = store.commit("preparing")
    assert committed.parent is None

    store.create_container("nextlayer", committed.chain_id)
    assert store.container("nextlayer").parent == committed.chain_id
    with mounted(store, "nextlayer") as mp:
        assert_same_tree(flat_initial, mp, "next layer before applying the diff")
        apply_ops(mp, diff)
    next_committed = store.commit("nextlayer")
    assert next_committed.parent == committed.chain_id
    assert chain_ids_of(store.layers()) == {committed.chain_id, next_committed.chain_id}
    got = {layer.chain_id: layer.parent for layer in store.layers()}
    assert got == {committed.chain_id: None, next_committed.chain_id: committed.chain_id}

    with mounted(store, next_committed.chain_id) as view:
        assert_same_tree(flat_both, view, "view of the second committed layer")

    # a layer with children cannot be removed
    store.remove_container("preparing")
    store.remove_container("nextlayer")
    with pytest.raises(errors.InUse):
        store.release(committed.chain_id)
    store.release(next_committed.chain_id)
    store.release(committed.chain_id)
    assert store.layers() == []


def test_stat_active_and_committed(store):
    store.create_container("preparing", None)
    with mounted(store, "preparing") as mp:
        (mp / "foo").write_bytes(b"foo\n")
        ctr = store.container("preparing")
        assert (ctr.name, ctr.parent) == ("preparing", None)
    committed = store.commit("preparing")
    got = store.layer(committed.chain_id)
    assert got.parent is None and got.chain_id == committed.chain_id


def test_transitivity(store):
    store.create_container("a", None)
    with mounted(store, "a") as mp:
        (mp / "foo").write_bytes(b"foo\n")
    snap_a = store.commit("a")
    store.create_container("b", snap_a.chain_id)
    with mounted(store, "b") as mp:
        (mp / "foo").write_bytes(b"foo bar\n")
    snap_b = store.commit("b")
    assert snap_a.parent is None
    assert snap_b.parent == snap_a.chain_id
    assert store.layer(store.layer(snap_b.chain_id).parent).parent is None
    with mounted(store, snap_b.chain_id) as mp:
        assert (mp / "foo").read_bytes() == b"foo bar\n"
    with mounted(store, snap_a.chain_id) as mp:
        assert (mp / "foo").read_bytes() == b"foo\n"


def test_remove_intermediate_layer_is_in_use(store):
    store.create_container("base", None)
    committed_base = store.commit("base")
    store.create_container("intermediate", committed_base.chain_id)
    with mounted(store, "intermediate") as mp:
        (mp / "i").write_bytes(b"i")
    committed_inter = store.commit("intermediate")
    store.create_container("top", committed_inter.chain_id)
    store.remove_container("intermediate")
    store.remove_container("base")
    with pytest.raises(errors.InUse):
        store.release(committed_inter.chain_id)
    store.remove_container("top")
    store.release(committed_inter.chain_id)
    store.release(committed_base.chain_id)
    assert store.layers() == []


def test_remove_then_reuse_name(store):
    store.create_container("committed-a", None)
    committed = store.commit("committed-a")
    store.create_container("reuse-1", committed.chain_id)
    store.remove_container("reuse-1")
    store.create_container("reuse-1", committed.chain_id)
    store.remove_container("reuse-1")
    store.create_container("reuse-1", None)
    store.remove_container("committed-a")
    store.release(committed.chain_id)
    with pytest.raises(errors.NotFound):
        store.layer(committed.chain_id)
    layer = store.commit("reuse-1")
    assert layer.parent is None
    assert chain_ids_of(store.layers()) == {layer.chain_id}


def test_layer_file_update(store, work_dir):
    """docker#21555: a file updated in an upper layer within the same second."""
    l1 = [
        create_dir("/etc", 0o700),
        create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
        create_file("/etc/profile", b"PATH=/usr/bin", 0o644),
    ]
    l2 = [
        create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),   # same size, same second
        create_file("/etc/profile", b"PATH=/usr/bin", 0o666),     # mode only
        create_dir("/root", 0o700),
        create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
    ]
    for i in range(3):
        if i:
            # the next run starts right at a second boundary
            now = time.time()
            time.sleep(int(now) + 1 - now)
        run = work_dir / f"run-{i}"
        run.mkdir()
        check_snapshots(store, run, l1, l2, prefix=f"run{i}")


def test_remove_directory_in_lower_layer(store, work_dir):
    """docker#25244: rm -rf a lower directory and recreate it (opaque dir)."""
    layers, _ = check_snapshots(
        store, work_dir,
        [create_dir("/lib", 0o700), create_file("/lib/hidden", b"", 0o644)],
        [remove_all("/lib"), create_dir("/lib", 0o700), create_file("/lib/not-hidden", b"", 0o644)],
        [create_file("/lib/newfile", b"", 0o644)],
    )
    with mounted(store, layers[-1].chain_id) as mp:
        assert sorted(os.listdir(mp / "lib")) == ["newfile", "not-hidden"]


def test_chown(store, work_dir):
    """docker#20240, #24913, #28391: chown of lower dirs and files."""
    check_snapshots(
        store, work_dir,
        [create_dir("/opt", 0o700), create_dir("/opt/a", 0o700), create_dir("/opt/a/b", 0o700),
         create_file("/opt/a/b/file.txt", b"hello", 0o644)],
        [chown("/opt", 1, 1), chown("/opt/a", 1, 1), chown("/opt/a/b", 1, 1),
         chown("/opt/a/b/file.txt", 1, 1)],
    )


def test_directory_permission_on_commit(store, work_dir):
    """docker#27298: ownership of directories through commits."""
    check_snapshots(
        store, work_dir,
        [create_dir("/dir1", 0o700), create_dir("/dir2", 0o700), create_dir("/dir3", 0o700),
         create_dir("/dir4", 0o700), create_file("/dir4/f1", b"...", 0o644),
         create_dir("/dir5", 0o700), create_file("/dir5/f1", b"...", 0o644),
         chown("/dir1", 1, 1), chown("/dir2", 1, 1), chown("/dir3", 1, 1),
         chown("/dir5", 1, 1), chown("/dir5/f1", 1, 1)],
        [chown("/dir2", 0, 0), remove_all("/dir3"), chown("/dir4", 1, 1), chown("/dir4/f1", 1, 1)],
        [create_dir("/dir3", 0o700), chown("/dir3", 1, 1), remove_all("/dir5"),
         create_dir("/dir5", 0o700), chown("/dir5", 1, 1)],
    )


def test_deleted_files_in_child_snapshot(store, work_dir):
    layers, _ = check_snapshots(
        store, work_dir,
        [create_file("/foo", b"foo\n", 0o777), create_file("/foobar", b"foobar\n", 0o777)],
        [remove_all("/foobar")],
        [],
    )
    with mounted(store, layers[-1].chain_id) as mp:
        assert not os.path.lexists(mp / "foobar")
        assert (mp / "foo").read_bytes() == b"foo\n"


def test_move_file_from_lower_layer(store, work_dir):
    check_snapshots(
        store, work_dir,
        [create_dir("/dir1", 0o700), create_file("/dir1/f1", b"Hello", 0o644),
         create_dir("/dir2", 0o700), create_file("/dir2/f2", b"...", 0o644)],
        [create_dir("/dir3", 0o700), create_file("/dir3/f1", b"Hello", 0o644),
         remove_all("/dir1"), link("/dir2/f2", "/dir3/f2"), remove_all("/dir2/f2")],
    )


def test_rename(store, work_dir):
    """docker#25409 (without the lower-directory rename overlayfs cannot do)."""
    check_snapshots(
        store, work_dir,
        [create_dir("/dir1", 0o700), create_dir("/somefiles", 0o700),
         create_file("/somefiles/f1", b"was here first!", 0o644),
         create_file("/somefiles/f2", b"nothing interesting", 0o644)],
        [create_file("/somefiles/f1-overwrite", b"new content 1", 0o644),
         rename("/somefiles/f1-overwrite", "/somefiles/f1"),
         rename("/somefiles/f2", "/somefiles/f3")],
    )


def test_view_readonly(store):
    store.create_container("preparing", None)
    committed = store.commit("preparing")
    with mounted(store, committed.chain_id) as view:
        with pytest.raises(OSError) as ei:
            (view / "testfile").write_bytes(b"testcontent")
        assert ei.value.errno == errno.EROFS
    store.remove_container("preparing")
    store.release(committed.chain_id)
    assert store.layers() == []


def test_root_permission(store):
    store.create_container("preparing", None)
    with mounted(store, "preparing") as mp:
        assert stat.S_IMODE(os.stat(mp).st_mode) == 0o755


def test_close_twice(store):
    store.create_container("closeTwice-prepare", None)
    layer = store.commit("closeTwice-prepare")
    store.remove_container("closeTwice-prepare")
    store.release(layer.chain_id)
    store.close()
    store.close()


def test_128_layers_mount(store, work_dir):
    """containerd check128LayersMount: 128 layers, each compared with a flat dir."""
    lowest = [
        create_file("/bottom", b"way at the bottom\n", 0o777),
        create_file("/overwriteme", b"FIRST!\n", 0o777),
        create_dir("/addhere", 0o755),
        create_dir("/onlyme", 0o755),
        create_file("/onlyme/bottom", b"bye!\n", 0o777),
    ]
    appliers = [lowest]
    for i in range(1, 128):
        appliers.append([
            create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
            create_file(f"/addhere/file-{i}", b"same\n", 0o755),
            remove_all("/onlyme"),
            create_dir("/onlyme", 0o755),
            create_file(f"/onlyme/file-{i}", b"only me!\n", 0o777),
        ])
    flat = work_dir / "flat"
    flat.mkdir()
    parent = None
    for i, ops in enumerate(appliers):
        name = f"prepare-layer-{i}"
        store.create_container(name, parent)
        with mounted(store, name) as mp:
            assert_same_tree(flat, mp, f"[layer {i}] before apply")
            apply_ops(flat, ops)
            apply_ops(mp, ops)
            assert_same_tree(flat, mp, f"[layer {i}] after apply")
        parent = store.commit(name).chain_id
        store.remove_container(name)
    with mounted(store, parent) as view:
        assert_same_tree(flat, view, "full view of 128 layers")
        assert (view / "overwriteme").read_bytes() == b"127 WAS HERE!\n"
        assert os.listdir(view / "onlyme") == ["file-127"]
        assert len(os.listdir(view / "addhere")) == 127
