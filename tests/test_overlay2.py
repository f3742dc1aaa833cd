"""overlay2-specific behaviour: backing filesystems, quotas, mount paths, depth, counts."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import layerfs
from tarbuild import simple_layer
from layerfs import _mountapi, errors

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for overlay and loop mounts")


def _tar(files: dict[str, bytes]) -> io.BytesIO:
    return io.BytesIO(simple_layer(files))


@contextmanager
def loop_fs(tmp_path: Path, mkfs: list[str], mount_opts: str, size_mb: int = 300):
    """A fresh filesystem on a loop device, mounted at tmp_path/mnt."""
    if shutil.which(mkfs[0]) is None:
        pytest.skip(f"{mkfs[0]} is not installed (make setup installs it)")
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-o", f"loop,{mount_opts}", str(image), str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        image.unlink()
        pytest.skip(f"this kernel cannot mount {mkfs[0]} with -o {mount_opts} (the VM step runs this test): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        for point in _mountapi.mounts_under(str(mnt)):
            _mountapi.umount(point, _mountapi.MNT_DETACH)
        image.unlink()  # the VM's TMPDIR is a small tmpfs: give the space back now


def test_backing_fs_without_dtype_is_refused_with_a_fix(tmp_path):
    with loop_fs(tmp_path, ["mkfs.ext4", "-q", "-F", "-O", "^filetype"], "rw", size_mb=64) as mnt:
        with pytest.raises(errors.DriverUnavailable) as info:
            layerfs.open_store(mnt / "root", driver="overlay2")
        message = str(info.value)
        assert "d_type" in message and "reformat" in message
        # Refused before anything was stored: no driver directory left behind.
        assert not (mnt / "root" / "overlay2").exists()


@pytest.mark.vm
def test_per_container_size_with_xfs_project_quota(tmp_path):
    with loop_fs(tmp_path, ["mkfs.xfs", "-q", "-f"], "pquota") as mnt:
        with layerfs.open_store(mnt / "root", options={"overlay2.size": "8M"}) as store:
            assert store.status()["probes"]["project_quota"] is True
            base = store.register(_tar({"f": b"x"}))
            store.create_container("small", base.chain_id)  # gets overlay2.size
            store.create_container("big", base.chain_id, size="32M")
            for name, limit in (("small", 8 << 20), ("big", 32 << 20)):
                path = store.mount(name)
                written = 0
                with pytest.raises(OSError) as info:
                    with open(path / "fill", "wb") as f:
                        chunk = b"\1" * (1 << 20)
                        while written < 4 * limit:
                            f.write(chunk)
                            f.flush()
                            os.fsync(f.fileno())
                            written += len(chunk)
                assert info.value.errno in (errno.EDQUOT, errno.ENOSPC)
                assert limit // 2 <= written <= limit
                store.unmount(name)


def test_size_without_project_quota_is_a_clear_error(tmp_path):
    with layerfs.open_store(tmp_path / "root") as store:
        if store.status()["probes"]["project_quota"]:
            pytest.skip("this backing filesystem has project quotas")
        with pytest.raises(errors.InvalidOption, match="pquota"):
            store.create_container("c", None, size="1G")
        assert store.containers() == []
        assert store.driver.ids() == set()
    with pytest.raises(errors.InvalidOption, match="pquota"):
        layerfs.open_store(tmp_path / "root", options={"overlay2.size": "1G"})


@pytest.mark.parametrize("bad", [{"overlay2.size": "lots"}, {"overlay2.mountapi": "magic"}, {"dm.basesize": "10G"}])
def test_bad_options_name_the_option(tmp_path, bad):
    with pytest.raises(errors.InvalidOption) as info:
        layerfs.open_store(tmp_path / "root", driver="overlay2", options=bad)
    assert next(iter(bad)) in str(info.value)


@pytest.mark.vm  # also on the VM's older kernel, where there is no lowerdir+ at all
def test_legacy_mount_path_with_short_links(tmp_path):
    depth = 150  # deeper than Docker's 128-layer limit with legacy mounts
    with layerfs.open_store(tmp_path / "root", options={"overlay2.mountapi": "legacy"}) as store:
        assert "legacy" in store.status()["probes"]["mount_api"]
        parent = None
        for i in range(depth):
            parent = store.register(_tar({f"f{i}": str(i).encode()}), parent=parent).chain_id
        store.create_container("c", parent)
        path = store.mount("c")
        assert sorted(os.listdir(path)) == sorted(f"f{i}" for i in range(depth))
        (path / "new").write_text("n")
        store.unmount("c")
        assert [str(c) for c in store.changes("c")] == ["A /new"]
        view = store.mount(parent)
        assert (view / "f0").read_text() == "0"
        store.unmount(parent)


def test_chain_deeper_than_the_kernel_allows_is_refused(tmp_path):
    with layerfs.open_store(tmp_path / "root") as store:
        limit = store.driver.max_depth
        parent = None
        for i in range(limit):
            parent = store.register(_tar({"f": str(i).encode()}), parent=parent).chain_id
        path = store.mount(parent)
        assert (path / "f").read_text() == str(limit - 1)
        store.unmount(parent)
        before = store.driver.ids()
        with pytest.raises(errors.InvalidLayer, match=str(limit)):
            store.register(_tar({"g": b"1"}), parent=parent)
        assert store.driver.ids() == before


def test_mount_counts_survive_the_process_and_reset_after_reboot(tmp_path):
    root = tmp_path / "root"
    with layerfs.open_store(root) as store:
        base = store.register(_tar({"f": b"1"}))
        store.create_container("c", base.chain_id)
    code = f"import layerfs; s = layerfs.open_store({str(root)!r}); print(s.mount('c')); s.mount('c')"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    with layerfs.open_store(root) as store:
        assert store.container("c").mounts == 2
        assert _mountapi.is_mountpoint(out)
        store.unmount("c")
        assert _mountapi.is_mountpoint(out)
        # A reboot unmounts everything; the store notices by the boot id.
        _mountapi.umount(out)
        with store.db.write() as db:
            db.execute("UPDATE meta SET value = 'an-earlier-boot' WHERE key = 'boot_id'")
    with layerfs.open_store(root) as store:
        assert store.container("c").mounts == 0
        assert store.check() == []


def test_concurrent_processes_share_one_root(tmp_path):
    root = tmp_path / "root"
    with layerfs.open_store(root) as store:
        base = store.register(_tar({"shared": b"s"}))
    worker = f"""
import io, sys, tarfile, layerfs
me = sys.argv[1]
with layerfs.open_store({str(root)!r}) as s:
    for i in range(15):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            ti = tarfile.TarInfo(f"f{{i}}"); ti.size = 1; tf.addfile(ti, io.BytesIO(b"x"))
        buf.seek(0)
        layer = s.register(buf, parent={base.chain_id!r})   # the same content from every process
        s.create_container(f"{{me}}-{{i}}", layer.chain_id)
        p = s.mount(f"{{me}}-{{i}}"); (p / "who").write_text(me); s.unmount(f"{{me}}-{{i}}")
        s.mount({base.chain_id!r}); s.unmount({base.chain_id!r})
"""
    procs = [subprocess.Popen([sys.executable, "-c", worker, f"w{n}"]) for n in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    with layerfs.open_store(root) as store:
        assert len(store.containers()) == 60
        layers = {l.chain_id: l for l in store.layers()}
        assert len(layers) == 16  # base + 15 shared layers, each registered 4 times
        assert all(l.refs == 4 for l in layers.values() if l.parent)
        assert store.check() == []
        assert _mountapi.mounts_under(str(root)) == []


def test_naive_diff_agrees_with_native_diff(tmp_path):
    """The naive diff (mount both views, compare) and overlay2's native diff give the same answer."""
    with layerfs.open_store(tmp_path / "root") as store:
        assert store.driver.features["native_diff"], "this kernel should allow the native diff"
        base = store.register(_tar({"etc/passwd": b"root\n", "etc/group": b"g\n", "d/a": b"1", "d/sub/b": b"2", "keep": b"k"}))
        store.create_container("c", base.chain_id)
        path = store.mount("c")
        (path / "etc/passwd").write_text("changed\n")
        os.unlink(path / "etc/group")
        shutil.rmtree(path / "d")
        (path / "d").mkdir()  # deleted and recreated: opaque
        (path / "d/new").write_text("n")
        (path / "added").mkdir()
        (path / "added/f").write_text("f")
        os.chmod(path / "keep", 0o600)
        store.unmount("c")

        native = store.changes("c")
        native_tar = io.BytesIO()
        store.export_diff("c", native_tar)
        store.driver.features["native_diff"] = False
        naive = store.changes("c")
        naive_tar = io.BytesIO()
        store.export_diff("c", naive_tar)
        assert naive == native
        assert "D /d/a" in [str(c) for c in native] and "D /d/sub" in [str(c) for c in native]

        # Both exports, applied on the parent, reproduce the container's view.
        views = []
        for n, data in enumerate((native_tar, naive_tar)):
            data.seek(0)
            layer = store.register(data, parent=base.chain_id)
            store.create_container(f"check{n}", layer.chain_id)
            root = store.mount(f"check{n}")
            views.append(sorted(str(p.relative_to(root)) for p in root.rglob("*")))
            assert (root / "etc/passwd").read_text() == "changed\n"
            assert oct(os.stat(root / "keep").st_mode & 0o777) == "0o600"
            store.unmount(f"check{n}")
        assert views[0] == views[1]
        assert "d/a" not in views[0] and "d/new" in views[0] and "etc/group" not in views[0]
