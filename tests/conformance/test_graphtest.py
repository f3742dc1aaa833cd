"""Behaviours of moby's daemon/graphdriver/graphtest, on the layerfs API.

moby drives a graphdriver directly (Create, CreateReadWrite, Get/Put, Diff,
ApplyDiff, Changes); here a writable layer is a container, Get/Put are
mount/unmount, Diff is export_diff, ApplyDiff is register on the parent.
"""

from __future__ import annotations

import errno
import io
import os
import random
import shutil
import stat
import subprocess

import pytest

from layerfs import errors

from conformance import (changes_of, container_names, mounted, register_bytes)
from conftest import detach_mounts_under, open_store_or_skip
from tarbuild import read_entries


def random_content(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _listdir(path):
    return sorted(n for n in os.listdir(path) if n != "lost+found")


def _verify(path, kind, mode, uid, gid):
    st = os.lstat(path)
    assert stat.S_IFMT(st.st_mode) == kind, f"{path}: wrong type"
    assert oct(stat.S_IMODE(st.st_mode)) == oct(mode), f"{path}: wrong mode"
    assert (st.st_uid, st.st_gid) == (uid, gid), f"{path}: wrong owner"


def _create_base(store, name):
    """moby createBase: a writable layer with a sticky dir and a setuid file."""
    store.create_container(name, None)
    old = os.umask(0)
    try:
        with mounted(store, name) as mp:
            sub = mp / "a subdir"
            os.mkdir(sub, 0o705)
            os.chmod(sub, 0o1705)
            os.chown(sub, 1, 2)
            f = mp / "a file"
            f.write_bytes(b"Some data")
            os.chmod(f, 0o4222)
    finally:
        os.umask(old)


def _verify_base(path):
    _verify(path / "a subdir", stat.S_IFDIR, 0o1705, 1, 2)
    _verify(path / "a file", stat.S_IFREG, 0o4222, 0, 0)
    assert (path / "a file").read_bytes() == b"Some data"
    assert _listdir(path) == ["a file", "a subdir"]


def _add_many_files(root, count, seed):
    for i in range(0, count, 100):
        d = root / f"directory-{i}"
        d.mkdir(exist_ok=True)
        for j in range(min(100, count - i)):
            f = d / f"file-{i + j}"
            f.write_bytes(random_content(64, seed + i + j))
            os.chmod(f, 0o755)


def _check_many_files(root, count, seed):
    for i in range(0, count, 100):
        for j in range(min(100, count - i)):
            p = root / f"directory-{i}" / f"file-{i + j}"
            assert p.read_bytes() == random_content(64, seed + i + j), p


def test_create_empty(store):
    store.create_container("empty", None)
    assert container_names(store) == {"empty"}
    with mounted(store, "empty") as mp:
        _verify(mp, stat.S_IFDIR, 0o755, 0, 0)
        assert _listdir(mp) == []
    store.remove_container("empty")
    assert store.containers() == []


def test_create_base(store):
    _create_base(store, "Base")
    with mounted(store, "Base") as mp:
        _verify_base(mp)
    # the same content once committed into a read-only layer
    layer = store.commit("Base")
    with mounted(store, layer.chain_id) as mp:
        _verify_base(mp)
    store.remove_container("Base")
    store.release(layer.chain_id)
    assert store.layers() == [] and store.containers() == []


def test_create_snap(store):
    _create_base(store, "Base")
    base = store.commit("Base")
    store.create_container("Snap", base.chain_id)
    with mounted(store, "Snap") as mp:
        _verify_base(mp)
    store.remove_container("Snap")
    store.remove_container("Base")
    store.release(base.chain_id)
    assert store.layers() == []


def test_deep_layer_read(store):
    """moby DriverTestDeepLayerRead: 50 layers, each naming itself and its parent."""
    count = 50
    store.create_container("base", None)
    with mounted(store, "base") as mp:
        (mp / "top-id").write_text("base")
    parent = store.commit("base").chain_id
    ids = ["base"]
    for i in range(1, count + 1):
        name = f"layer-{i}-" + os.urandom(4).hex()
        store.create_container(name, parent)
        with mounted(store, name) as mp:
            (mp / "top-id").write_text(name)
            d = mp / f"layer-{i}"
            d.mkdir()
            (d / "layer-id").write_text(name)
            (d / "parent-id").write_text(ids[-1])
        parent = store.commit(name).chain_id
        ids.append(name)
    with mounted(store, parent) as mp:
        layer_id = (mp / "top-id").read_text()
        assert layer_id == ids[-1]
        for i in range(count, 0, -1):
            assert (mp / f"layer-{i}/layer-id").read_text() == layer_id
            layer_id = (mp / f"layer-{i}/parent-id").read_text()
        assert layer_id == "base"


@pytest.mark.parametrize("file_count", [10, 250])
def test_diff_apply_with_deletions(store, file_count):
    """moby DriverTestDiffApply: a diff with deletions applied onto the base."""
    delete_file = "file-remove.txt"
    delete_content = b"This file should get removed in upper!"
    delete_dir = "var/lib"
    _create_base(store, "base")
    with mounted(store, "base") as mp:
        _add_many_files(mp, file_count, 3)
        (mp / delete_file).write_bytes(delete_content)
        (mp / delete_dir).mkdir(parents=True)
    base = store.commit("base")

    store.create_container("upper", base.chain_id)
    with mounted(store, "upper") as mp:
        _add_many_files(mp, file_count, 6)
        os.unlink(mp / delete_file)
        shutil.rmtree(mp / delete_dir)

    store.create_container("diff-target", base.chain_id)
    with mounted(store, "diff-target") as mp:
        assert (mp / delete_file).read_bytes() == delete_content

    buf = io.BytesIO()
    diff_id = store.export_diff("upper", buf)
    data = buf.getvalue()
    diff_size = sum(ti.size for ti in read_entries(data) if ti.isreg())
    assert diff_size == file_count * 64
    applied = register_bytes(store, data, parent=base.chain_id)
    assert applied.diff_id == diff_id
    assert applied.size == diff_size
    with mounted(store, applied.chain_id) as mp:
        _check_many_files(mp, file_count, 6)
        assert not os.path.lexists(mp / delete_file)
        assert not os.path.lexists(mp / delete_dir)
        assert (mp / "var").is_dir()
        _verify(mp / "a file", stat.S_IFREG, 0o4222, 0, 0)


@pytest.mark.parametrize("file_count", [20, 300])
def test_changes(store, file_count):
    """moby DriverTestChanges: modify / add / remove every third file."""
    _create_base(store, "base")
    with mounted(store, "base") as mp:
        _add_many_files(mp, file_count, 3)
    base = store.commit("base")
    store.create_container("upper", base.chain_id)
    seed = 6
    expected = []
    with mounted(store, "upper") as mp:
        for i in range(0, file_count, 100):
            archive_root = f"/directory-{i}"
            expected.append((archive_root, "C"))
            for j in range(min(100, file_count - i)):
                if j % 3 == 0:      # update
                    path = f"{archive_root}/file-{i + j}"
                    (mp / path.lstrip("/")).write_bytes(random_content(64, seed + i + j))
                    expected.append((path, "C"))
                elif j % 3 == 1:    # add
                    path = f"{archive_root}/file-{seed}-{i + j}"
                    (mp / path.lstrip("/")).write_bytes(random_content(64, seed + i + j))
                    expected.append((path, "A"))
                else:               # remove
                    path = f"{archive_root}/file-{i + j}"
                    os.unlink(mp / path.lstrip("/"))
                    expected.append((path, "D"))
    got = changes_of(store, "upper")
    assert sorted(got) == sorted(expected)
    assert [p for p, _ in got] == sorted(p for p, _ in got)


# ---------------------------------------------------------------------------
# SetQuota


def _write_random(path, size):
    chunk = random_content(1 << 20, 0)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            f.write(chunk)
            written += len(chunk)
        f.flush()
        os.fsync(f.fileno())


QUOTA = 50 * 1024 * 1024
_QUOTA_ERRNOS = (errno.EDQUOT, errno.ENOSPC)


def _check_quota_enforced(store, name):
    with mounted(store, name) as mp:
        with pytest.raises(OSError) as ei:
            _write_random(mp / "file", 2 * QUOTA)
        assert ei.value.errno in _QUOTA_ERRNOS, ei.value
        # within the quota is fine
        os.unlink(mp / "file")
        _write_random(mp / "small", QUOTA // 4)


def test_set_quota_or_refuse(store):
    """On the default backing fs: either the size is enforced or refused up front."""
    _create_base(store, "Base")
    base = store.commit("Base")
    try:
        store.create_container("quota", base.chain_id, size=QUOTA)
    except errors.LayerfsError as e:
        assert "quota" not in container_names(store), "refused size left a container behind"
        assert str(e)
        pytest.skip(f"driver refuses container sizes on this backing fs: {e}")
    _check_quota_enforced(store, "quota")


@pytest.fixture
def xfs_pquota_dir(tmp_path):
    """An xfs loop image mounted with project quotas."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs not installed (apt-get install xfsprogs)")
    img = tmp_path / "xfs.img"
    mnt = tmp_path / "xfs"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(img)], check=True, capture_output=True)
    r = subprocess.run(["mount", "-o", "loop,pquota", str(img), str(mnt)], capture_output=True)
    if r.returncode != 0:
        img.unlink()
        pytest.skip("cannot mount an xfs loop image with pquota (does the kernel have "
                    f"CONFIG_XFS_QUOTA?): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        detach_mounts_under(mnt)
        img.unlink()  # the VM's TMPDIR is a small tmpfs: give the space back now


@pytest.mark.vm  # this host's kernel has no XFS quota support; the VM's has
def test_set_quota_on_xfs(xfs_pquota_dir, driver_name):
    if driver_name == "devicemapper":
        pytest.skip("devicemapper: a container's size is its thin device's (dm.basesize, grown by size=), "
                    "not a project quota of the backing filesystem; test_devicemapper.py tests sizes")
    root = xfs_pquota_dir / "root"
    root.mkdir()
    store = open_store_or_skip(root, driver_name)
    try:
        _create_base(store, "Base")
        base = store.commit("Base")
        store.create_container("zfsTest", base.chain_id, size=QUOTA)
        _check_quota_enforced(store, "zfsTest")
        # a container without a size is not limited by another's quota
        store.create_container("unlimited", base.chain_id)
        with mounted(store, "unlimited") as mp:
            _write_random(mp / "file", 2 * QUOTA)
    finally:
        store.close()
        detach_mounts_under(root)


@pytest.mark.vm  # this host's kernel has no XFS quota support; the VM's has
def test_default_size_option_on_xfs(xfs_pquota_dir, driver_name):
    if driver_name != "overlay2":
        pytest.skip("overlay2.size is an overlay2 option")
    root = xfs_pquota_dir / "root"
    root.mkdir()
    store = open_store_or_skip(root, driver_name, options={"overlay2.size": "50M"})
    try:
        store.create_container("sized", None)
        _check_quota_enforced(store, "sized")
    finally:
        store.close()
        detach_mounts_under(root)
