"""Layers applied by a worker process (layerfs/_applyproc.py, ``apply_tar(isolate=True)``).

The worker must give exactly what the in-process apply gives (tree, diff id,
whiteouts, errors naming the entry), be reaped before the call returns or
raises, and die with its caller.  register_chain hands big layers applied side
by side to workers.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import layerfs
from layerfs import archive, graph
from layerfs.archive import WhiteoutFormat, apply_tar
from layerfs.errors import DigestMismatch, InvalidLayer
from tarbuild import LayerTar, gzip_bytes, zstd_bytes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, trusted.* xattrs)")


def _tree(root) -> dict:
    """path -> (type and mode, owner, size, mtime, link target, content, xattrs), not following symlinks."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content = None
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    content = f.read()
            xattrs = {} if os.path.islink(path) else {x: os.getxattr(path, x) for x in os.listxattr(path)}
            link = os.readlink(path) if os.path.islink(path) else None
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # made now, not from the tar: no mtime
            mtime = None if whiteout else st.st_mtime_ns
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, mtime, link, content, xattrs, st.st_rdev)
    return out


def _rich_layer() -> bytes:
    big = bytes(range(256)) * 8192  # 2 MiB: written by the main thread, not the small-file workers
    return (
        LayerTar()
        .dirs("etc", "usr", "usr/bin", "opq")
        .file("etc/passwd", b"root:x:0:0\n", mode=0o644)
        .file("usr/bin/tool", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000)
        .file("usr/big", big)
        .file("opq/.wh..wh..opq", b"")
        .file("etc/.wh.shadow", b"")
        .symlink("usr/bin/sh", "busybox")
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .chardev("dev-null", 1, 3)
        .file("xattr", b"x", xattrs={"user.k": "v"})
        .bytes()
    )


@pytest.mark.parametrize("fmt", [WhiteoutFormat.OVERLAY, WhiteoutFormat.AUFS])
@pytest.mark.parametrize("codec", [lambda b: b, gzip_bytes, zstd_bytes], ids=["plain", "gzip", "zstd"])
def test_worker_gives_what_the_in_process_apply_gives(tmp_path, fmt, codec):
    data = codec(_rich_layer())
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    expected = apply_tar(io.BytesIO(data), here, fmt)
    got = apply_tar(io.BytesIO(data), there, fmt, isolate=True)
    assert got == expected
    assert _tree(there) == _tree(here)


def test_worker_refuses_hostile_entries_naming_them(tmp_path):
    data = LayerTar().symlink("a", "/etc").file("a/passwd", b"pwned").bytes()
    with pytest.raises(InvalidLayer, match=r"'a/passwd'"):
        apply_tar(io.BytesIO(data), tmp_path, WhiteoutFormat.OVERLAY, isolate=True)
    assert _no_workers()


def test_worker_truncated_and_corrupt_streams(tmp_path):
    whole = _rich_layer()
    (tmp_path / "a").mkdir()
    with pytest.raises(InvalidLayer, match="truncated or malformed"):
        apply_tar(io.BytesIO(whole[: len(whole) // 2]), tmp_path / "a", WhiteoutFormat.OVERLAY, isolate=True)
    gz = bytearray(gzip_bytes(whole))
    gz[len(gz) // 2] ^= 0xFF
    (tmp_path / "b").mkdir()
    with pytest.raises(InvalidLayer, match="truncated or malformed"):
        apply_tar(io.BytesIO(bytes(gz)), tmp_path / "b", WhiteoutFormat.OVERLAY, isolate=True)
    assert _no_workers()


def test_reader_error_stops_the_worker_and_is_raised(tmp_path):
    """An error of the source (a digest check, a dropped download) wins; the worker is reaped."""

    class Failing(io.RawIOBase):
        def __init__(self):
            self._data = io.BytesIO(_rich_layer())

        def readable(self):
            return True

        def readinto(self, buf):
            if self._data.tell() > 64 << 10:
                raise DigestMismatch("blob sha256:abc is corrupted")
            return self._data.readinto(memoryview(buf)[: 16 << 10])

    with pytest.raises(DigestMismatch, match="sha256:abc"):
        apply_tar(Failing(), tmp_path, WhiteoutFormat.OVERLAY, isolate=True)
    assert _no_workers()


def _no_workers() -> bool:
    """No layerfs._applyproc child of this process is left (reaped, not a zombie)."""
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == me and b"layerfs._applyproc" in cmd:
            return False
    return True


def _big_layer(tag: str, mib: int = 9) -> bytes:
    """A layer of at least *mib* MiB as stored, with a few hundred small files too."""
    tar = LayerTar().dir(tag)
    for i in range(300):
        tar.file(f"{tag}/f{i}", f"{tag}-{i}\n".encode())
    return tar.file(f"{tag}/blob", os.urandom(mib << 20)).bytes()


def test_layers_to_isolate_spares_the_largest_big_layer():
    mib = 1 << 20
    assert graph._layers_to_isolate([]) == set()
    assert graph._layers_to_isolate([mib, 2 * mib]) == set()  # small layers stay in process
    assert graph._layers_to_isolate([128 * mib, 48 * mib, 1]) == {1}
    assert graph._layers_to_isolate([48 * mib, 128 * mib, 20 * mib]) == {0, 2}
    assert graph._layers_to_isolate([20 * mib, 20 * mib]) == {1}  # a tie keeps the first
    assert graph._layers_to_isolate([0, 0, 0]) == set()  # sizes unknown


def test_register_chain_applies_big_layers_in_workers(tmp_path, monkeypatch):
    paths = []
    for i, (tag, mib) in enumerate([("base", 12), ("app", 9), ("lib", 10)]):
        p = tmp_path / f"{i}.tar"
        p.write_bytes(_big_layer(tag, mib))
        paths.append(p)
    paths.append(tmp_path / "3.tar")
    paths[3].write_bytes(LayerTar().file("base/.wh.f0", b"").bytes())  # small: applied in process
    isolated = []
    real = archive.apply_tar

    def spy(src, dest, fmt, *, isolate=False):
        isolated.append((os.path.getsize(src.name) >> 20 if hasattr(src, "name") else None, isolate))
        return real(src, dest, fmt, isolate=isolate)

    monkeypatch.setattr(archive, "apply_tar", spy)
    with layerfs.open_store(tmp_path / "store", driver="overlay2") as store:
        layers = store.register_chain([(p, _diff_id(p)) for p in paths])
        # The largest big layer (12 MiB) is applied in process, the other big ones in workers.
        assert sorted(isolated) == [(0, False), (9, True), (10, True), (12, False)]
        top = layers[-1].chain_id
        root = store.mount(top)
        try:
            assert sorted(os.listdir(root)) == ["app", "base", "lib"]
            assert not os.path.exists(os.path.join(root, "base", "f0"))
            with open(os.path.join(root, "app", "f7")) as f:
                assert f.read() == "app-7\n"
            assert os.path.getsize(os.path.join(root, "base", "blob")) == 12 << 20
        finally:
            store.unmount(top)
        assert store.check() == []
    assert graph.ISOLATE_MIN_BYTES <= 9 << 20


def test_register_chain_failure_in_a_worker_leaves_the_store_unchanged(tmp_path):
    good = tmp_path / "good.tar"
    good.write_bytes(_big_layer("base", 12))  # the largest, applied in process: the bad one gets the worker
    bad = tmp_path / "bad.tar"
    bad.write_bytes(LayerTar().file("pad", os.urandom(9 << 20)).symlink("l", "/etc").file("l/passwd", b"x").bytes())
    with layerfs.open_store(tmp_path / "store", driver="overlay2") as store:
        with pytest.raises(InvalidLayer, match=r"'l/passwd'"):
            store.register_chain([(good, _diff_id(good)), (bad, _diff_id(bad))])
        assert store.layers() == []
        assert store.driver.ids() == set()
        assert store.check() == []
    assert _no_workers()


def _diff_id(path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_worker_dies_with_its_caller(tmp_path):
    """SIGKILL the process applying: its worker goes too, and reopening the store repairs it."""
    fifo = tmp_path / "layer.fifo"
    os.mkfifo(fifo)
    other = tmp_path / "other.tar"
    other.write_bytes(_big_layer("other"))
    script = textwrap.dedent(
        f"""
        import sys, layerfs
        class Hint:
            size_hint = 64 << 20
            def __init__(self): self.f = open({str(fifo)!r}, "rb")
            def read(self, n=-1): return self.f.read(n)
        def opener():
            return Hint()
        opener.size_hint = 64 << 20
        with layerfs.open_store({str(tmp_path / "store")!r}, driver="overlay2") as store:
            store.register_chain([(opener, "sha256:" + "0" * 64), ({str(other)!r}, "sha256:" + "1" * 64)])
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(layerfs.__file__)))
    writer = open(fifo, "wb")  # blocks until the child opened the FIFO
    try:
        writer.write(LayerTar().dir("d").file("d/f", b"partial").bytes()[:1024])
        writer.flush()
        workers = _wait_for_workers(proc.pid)
        assert workers, "the big layers were not handed to workers"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{w}") and not _zombie(w) for w in workers):
            time.sleep(0.05)
        assert not [w for w in workers if os.path.exists(f"/proc/{w}") and not _zombie(w)]
    finally:
        try:
            writer.close()
        except BrokenPipeError:
            pass
    with layerfs.open_store(tmp_path / "store", driver="overlay2") as store:
        assert store.layers() == []
        assert store.driver.ids() == set()
        assert store.check() == []


def _wait_for_workers(parent: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if ppid == parent and b"layerfs._applyproc" in cmd:
                found.append(int(pid))
        if found:
            return found
        time.sleep(0.05)
    return []


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
