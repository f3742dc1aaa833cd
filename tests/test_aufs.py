"""aufs-specific behaviour: the union over FUSE, copy-up, hardlinks, renames, the daemon.

The conformance suite covers what every driver shares; these tests drive the
aufs driver directly (its layers applied from tars, its containers mounted by
its daemon) for what only a union in user space has: whiteout and opaque
invisibility, reserved names, copy-up metadata, hardlinks across copy-up,
rename rules, a program run inside the mount, daemon crashes.  The union
module itself is also property-tested against a flattened reference.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from layerfs import archive
from layerfs.changes import tree_changes
from layerfs.drivers import Driver

from conformance import assert_same_tree, snapshot
from tarbuild import LayerTar


def _fuse_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed (pip install pyfuse3; needs libfuse3-dev and pkg-config)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse is unusable here: {exc.strerror}"
    return None


_MISSING = _fuse_missing()
fuse = pytest.mark.skipif(_MISSING is not None, reason=f"FUSE: {_MISSING}")


@pytest.fixture
def drv(tmp_path):
    if _MISSING is not None:
        pytest.skip(f"FUSE: {_MISSING}")
    from layerfs.drivers.aufs import AufsDriver

    d = AufsDriver(tmp_path / "root" / "aufs", {})
    yield d
    for id in d.ids():
        d.put(id)
    from conftest import detach_mounts_under

    detach_mounts_under(tmp_path)


def layer(drv, id, parent, tar: LayerTar):
    drv.create(id, parent)
    drv.apply(id, parent, io.BytesIO(tar.bytes()))
    return id


def container(drv, id, parent):
    drv.create(id, parent, writable=True)
    return drv.get(id)


def _base() -> LayerTar:
    return (LayerTar()
            .dir("etc")
            .file("etc/passwd", b"root:x:0:0\n")
            .file("etc/hosts", b"127.0.0.1\n")
            .dir("lib")
            .file("lib/a", b"a")
            .file("lib/b", b"b")
            .dir("lib/sub")
            .file("lib/sub/c", b"c")
            .dir("keep")
            .file("keep/k", b"k")
            .file("top", b"top"))


def _upper() -> LayerTar:
    return (LayerTar()
            .dir("etc").whiteout("etc/hosts").file("etc/new", b"new")
            .dir("lib").opaque("lib").file("lib/only", b"only")
            .whiteout("top")
            .whiteout("never-existed"))


# ---------------------------------------------------------------------------
# the union, through a mount


def test_whiteouts_and_opaque_dirs_are_invisible(drv):
    layer(drv, "l1", None, _base())
    layer(drv, "l2", "l1", _upper())
    mp = container(drv, "c", "l2")
    assert sorted(os.listdir(mp)) == ["etc", "keep", "lib"]
    assert sorted(os.listdir(mp / "etc")) == ["new", "passwd"]
    assert sorted(os.listdir(mp / "lib")) == ["only"]
    for hidden in ("etc/hosts", "top", "lib/a", "lib/sub", "etc/.wh.hosts", "lib/.wh..wh..opq", ".wh.top"):
        assert not os.path.lexists(mp / hidden), hidden
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(mp) for n in ds + fs)
    # the read-only view of the upper layer shows the same
    view = drv.get("l2", readonly=True)
    assert snapshot(view) == snapshot(mp)


def test_same_layer_whiteout_and_directory_is_opaque(drv):
    layer(drv, "l1", None, _base())
    layer(drv, "l2", "l1", LayerTar().whiteout("lib").dir("lib").file("lib/fresh", b"f"))
    view = drv.get("l2", readonly=True)
    assert os.listdir(view / "lib") == ["fresh"]


def test_cached_listings_follow_every_change(drv):
    """The kernel caches directory listings (FOPEN_CACHE_DIR): each change through the mount must show."""
    layer(drv, "l1", None, _base())
    layer(drv, "l2", "l1", _upper())
    mp = container(drv, "c", "l2")

    def ls(rel=""):
        with os.scandir(mp / rel if rel else mp) as it:
            return sorted(e.name for e in it)

    for _ in range(2):  # the second listing comes from the kernel's cache
        assert ls("etc") == ["new", "passwd"]
        assert ls("lib") == ["only"]
    (mp / "etc" / "made").write_bytes(b"m")
    assert ls("etc") == ["made", "new", "passwd"]
    (mp / "etc" / "passwd").unlink()
    assert ls("etc") == ["made", "new"]
    os.rename(mp / "etc" / "made", mp / "lib" / "moved")
    assert ls("etc") == ["new"] and ls("lib") == ["moved", "only"]
    (mp / "keep" / "k").write_bytes(b"copied up")  # copy-up changes no listing
    assert ls("keep") == ["k"]
    os.mkdir(mp / "keep" / "d")
    os.link(mp / "keep" / "k", mp / "etc" / "k2")
    os.symlink("k", mp / "keep" / "s")
    os.mknod(mp / "keep" / "fifo", stat.S_IFIFO | 0o600)
    assert ls("keep") == ["d", "fifo", "k", "s"] and ls("etc") == ["k2", "new"]
    os.rmdir(mp / "keep" / "d")
    shutil.rmtree(mp / "lib")
    assert ls("keep") == ["fifo", "k", "s"] and ls() == ["etc", "keep"]
    os.mkdir(mp / "lib")
    assert ls("lib") == [] and ls() == ["etc", "keep", "lib"]
    # a second handle open across a change sees it after rewinding
    fd = os.open(mp / "etc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sorted(os.listdir(fd)) == ["k2", "new"]
        (mp / "etc" / "late").write_bytes(b"")
        assert sorted(os.listdir(fd)) == ["k2", "late", "new"]
    finally:
        os.close(fd)


def test_listing_read_in_pieces_while_entries_go(drv):
    """Directory offsets survive changes: a reader sees every entry that stays, once."""
    t = LayerTar().dir("big")
    for i in range(1500):
        t.file(f"big/low{i:04d}")
    layer(drv, "l1", None, t)
    mp = container(drv, "c", "l1")
    for i in range(1500):
        (mp / "big" / f"up{i:04d}").write_bytes(b"")
    doomed = {f"low{i:04d}" for i in range(0, 1500, 3)} | {f"up{i:04d}" for i in range(1, 1500, 3)}
    seen = []
    with os.scandir(mp / "big") as it:  # getdents in pieces, the kernel's cache dropped by each unlink
        for n, e in enumerate(it):
            seen.append(e.name)
            if n == 10:
                for name in doomed:
                    if name not in seen:
                        os.unlink(mp / "big" / name)
    assert len(seen) == len(set(seen))
    everything = {f"low{i:04d}" for i in range(1500)} | {f"up{i:04d}" for i in range(1500)}
    assert everything - doomed <= set(seen) <= everything
    assert set(os.listdir(mp / "big")) == everything - (doomed - set(seen[:11]))


def test_names_looked_up_as_missing_appear_when_made(drv):
    """Negative entries (cached by the kernel for the entry timeout) never hide a name made later through the mount."""
    layer(drv, "l1", None, _base())
    layer(drv, "l2", "l1", _upper())
    mp = container(drv, "c", "l2")
    names = ["created", "renamed", "linked", "dir", "sym", "fifo", "etc/hosts", "top", "lib/a"]
    for name in names:  # each one looked up and found missing (whited out or never there)
        with pytest.raises(FileNotFoundError):
            os.lstat(mp / name)
    with open(mp / "created", "xb") as f:
        f.write(b"new file")
    (mp / "source").write_bytes(b"moved")
    os.rename(mp / "source", mp / "renamed")
    os.link(mp / "keep" / "k", mp / "linked")
    os.mkdir(mp / "dir")
    os.symlink("created", mp / "sym")
    os.mkfifo(mp / "fifo")
    (mp / "etc" / "hosts").write_bytes(b"back")  # over an upper whiteout
    os.rename(mp / "created", mp / "top")  # over a lower whiteout, from another name
    os.rename(mp / "keep" / "k", mp / "lib" / "a")  # a lower file onto a name its opaque dir hides
    assert (mp / "top").read_bytes() == b"new file"
    assert not os.path.lexists(mp / "created")
    assert (mp / "renamed").read_bytes() == b"moved"
    assert (mp / "linked").read_bytes() == b"k"
    assert os.lstat(mp / "linked").st_ino == os.lstat(mp / "lib" / "a").st_ino  # k was moved there
    assert os.lstat(mp / "linked").st_nlink == 2
    assert os.path.isdir(mp / "dir") and os.listdir(mp / "dir") == []
    assert os.readlink(mp / "sym") == "created"
    assert stat.S_ISFIFO(os.lstat(mp / "fifo").st_mode)
    assert (mp / "etc" / "hosts").read_bytes() == b"back"
    assert (mp / "lib" / "a").read_bytes() == b"k"
    assert sorted(os.listdir(mp)) == ["dir", "etc", "fifo", "keep", "lib", "linked", "renamed", "sym", "top"]
    assert sorted(os.listdir(mp / "lib")) == ["a", "only"]
    assert os.listdir(mp / "keep") == []
    # a name made, removed and looked up again is missing again, then made again
    os.unlink(mp / "renamed")
    with pytest.raises(FileNotFoundError):
        os.lstat(mp / "renamed")
    os.mkdir(mp / "renamed")
    assert os.path.isdir(mp / "renamed")


def test_lowlevel_hooks_are_active(drv):
    """With this pyfuse3/libfuse the daemon wraps pyfuse3's operations table (else: slower, see _lowlevel)."""
    layer(drv, "l1", None, _base())
    mp = container(drv, "c", "l1")
    assert sorted(os.listdir(mp)) == sorted(os.listdir(drv.home / "l1" / "diff"))
    log = (drv.home / "run" / "c.log").read_text()
    assert "mounted" in log and "not wrapped" not in log, log
    assert "blocking loop" in log, log  # _loop found pyfuse3's statics: no trio per request


@pytest.mark.parametrize("mode", ["loop", "trio"])
def test_daemon_stops_on_sigterm_and_unmounts(drv, tmp_path, mode):
    """SIGTERM (the blocking loop's read interrupted; or trio's signal task) unmounts and exits 0."""
    layer(drv, "l1", None, _base())
    top, mp = tmp_path / "top", tmp_path / "mnt"
    top.mkdir()
    mp.mkdir()
    cmd = [sys.executable, "-m", "layerfs.drivers.aufs", "--mountpoint", str(mp),
           "--branches", str(top), str(drv.home / "l1" / "diff")]
    if mode == "trio":
        cmd.append("--no-lowlevel")
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        for _ in range(1000):
            if os.path.ismount(mp) or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert os.path.ismount(mp), (tmp_path / "log").read_text()
        (mp / "made").write_bytes(b"before the signal")
        time.sleep(0.2)  # idle: the daemon waits in its read of /dev/fuse
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (tmp_path / "log").read_text()
        assert not os.path.ismount(mp)
        assert (top / "made").read_bytes() == b"before the signal"
        text = (tmp_path / "log").read_text()
        assert "unmounted" in text
        assert ("blocking loop" in text) == (mode == "loop"), text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-l", str(mp)], check=False, capture_output=True)

def test_daemon_without_its_lowlevel_hooks(drv, tmp_path):
    """--no-lowlevel (pyfuse3's own operations table: opendir served, writes copied) gives the same union."""
    layer(drv, "l1", None, _base())
    layer(drv, "l2", "l1", _upper())
    top, mp = tmp_path / "top", tmp_path / "mnt"
    top.mkdir()
    mp.mkdir()
    pidfile = tmp_path / "pid"
    cmd = [sys.executable, "-m", "layerfs.drivers.aufs", "--detach", str(pidfile), "--no-lowlevel",
           "--mountpoint", str(mp), "--branches", str(top), str(drv.home / "l2" / "diff"), str(drv.home / "l1" / "diff")]
    log = open(tmp_path / "log", "w")
    subprocess.run(cmd, check=True, stdout=log, stderr=log, timeout=30)
    try:
        for _ in range(500):
            if os.path.ismount(mp):
                break
            time.sleep(0.01)
        assert sorted(os.listdir(mp / "etc")) == ["new", "passwd"]
        data = os.urandom(3 << 20)
        with open(mp / "etc" / "big", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        assert (top / "etc" / "big").read_bytes() == data
        fd = os.open(mp / "etc", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
            assert sorted(os.listdir(fd)) == ["big", "new", "passwd"]
        finally:
            os.close(fd)
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], check=False)
        pid = int(pidfile.read_text())
        for _ in range(500):
            if not _running(pid):
                break
            time.sleep(0.01)
    assert "not wrapped" in (tmp_path / "log").read_text()


def test_new_entries_belong_to_the_caller(drv):
    """Owner of new entries: the caller's ids, the group of a setgid directory (root or not)."""
    layer(drv, "l1", None, _base())
    mp = container(drv, "c", "l1")
    os.mkdir(mp / "open", 0o777)
    os.chmod(mp / "open", 0o777)
    os.mkdir(mp / "sg", 0o777)
    os.chown(mp / "sg", 0, 50)
    os.chmod(mp / "sg", 0o2777)
    for d in ("open", "sg"):
        # cwd: the user could not walk down to the mount point (0700 directories above it)
        subprocess.run(["/bin/sh", "-c", "touch f && mkdir d && ln -s f l"],
                       check=True, user=1000, group=1001, extra_groups=[], cwd=mp / d)
    for name in ("f", "d", "l"):
        st = os.lstat(mp / "open" / name)
        assert (st.st_uid, st.st_gid) == (1000, 1001), name
        st = os.lstat(mp / "sg" / name)
        assert (st.st_uid, st.st_gid) == (1000, 50), name
    assert os.lstat(mp / "sg" / "d").st_mode & stat.S_ISGID
    os.mkdir(mp / "sg" / "root")
    (mp / "sg" / "rootf").write_bytes(b"")
    for name in ("root", "rootf"):
        st = os.lstat(mp / "sg" / name)
        assert (st.st_uid, st.st_gid) == (0, 50), name
    (mp / "open" / "rootf").write_bytes(b"")
    st = os.lstat(mp / "open" / "rootf")
    assert (st.st_uid, st.st_gid) == (0, 0)
    # what the branch holds is what the mount shows
    st = os.lstat(Path(drv.home) / "c" / "diff" / "sg" / "f")
    assert (st.st_uid, st.st_gid) == (1000, 50)


def test_reserved_names_cannot_be_created(drv):
    layer(drv, "l1", None, _base())
    mp = container(drv, "c", "l1")
    attempts = {
        "create": lambda: (mp / ".wh.x").write_bytes(b""),
        "create-opaque": lambda: (mp / "lib/.wh..wh..opq").write_bytes(b""),
        "mkdir": lambda: os.mkdir(mp / ".wh.d"),
        "symlink": lambda: os.symlink("x", mp / ".wh.s"),
        "mknod": lambda: os.mkfifo(mp / ".wh.f"),
        "link": lambda: os.link(mp / "top", mp / ".wh.l"),
        "rename": lambda: os.rename(mp / "top", mp / ".wh.top2"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EPERM, what
    assert sorted(os.listdir(mp)) == ["etc", "keep", "lib", "top"]
    # and the names that look like whiteouts but are not, work
    (mp / ".wh-not").write_bytes(b"ok")
    (mp / "x.wh.y").write_bytes(b"ok")
    assert (mp / ".wh-not").read_bytes() == b"ok"


def test_views_are_read_only(drv):
    layer(drv, "l1", None, _base())
    view = drv.get("l1", readonly=True)
    attempts = [
        lambda: (view / "new").write_bytes(b"x"),
        lambda: open(view / "etc/passwd", "r+b").close(),
        lambda: os.mkdir(view / "d"),
        lambda: os.unlink(view / "top"),
        lambda: os.rmdir(view / "keep"),
        lambda: os.chmod(view / "top", 0o600),
        lambda: os.chown(view / "top", 1, 1),
        lambda: os.utime(view / "top", (1, 1)),
        lambda: os.truncate(view / "top", 0),
        lambda: os.setxattr(view / "top", "user.x", b"1"),
        lambda: os.rename(view / "top", view / "top2"),
        lambda: os.link(view / "top", view / "top2"),
        lambda: os.symlink("x", view / "s"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS
    assert (view / "top").read_bytes() == b"top"
    # a container mounted read-only is a view too
    drv.create("c", "l1", writable=True)
    ro = drv.get("c", readonly=True)
    with pytest.raises(OSError) as ei:
        (ro / "x").write_bytes(b"x")
    assert ei.value.errno == errno.EROFS


def test_delete_and_recreate(drv):
    layer(drv, "l1", None, _base())
    mp = container(drv, "c", "l1")
    os.unlink(mp / "top")
    shutil.rmtree(mp / "lib")
    assert not os.path.lexists(mp / "top") and not os.path.lexists(mp / "lib")
    os.mkdir(mp / "lib")
    (mp / "lib/new").write_bytes(b"n")
    (mp / "top").write_bytes(b"again")
    assert os.listdir(mp / "lib") == ["new"]
    assert (mp / "top").read_bytes() == b"again"
    diff = drv.home / "c" / "diff"
    assert (diff / "lib" / ".wh..wh..opq").exists()
    assert not (diff / ".wh.lib").exists() and not (diff / ".wh.top").exists()
    drv.put("c")
    mp = drv.get("c")
    assert os.listdir(mp / "lib") == ["new"]
    assert sorted((c.path, c.kind) for c in drv.changes("c", "l1")) == [
        ("/lib", "C"), ("/lib/a", "D"), ("/lib/b", "D"), ("/lib/new", "A"), ("/lib/sub", "D"), ("/top", "C")]


def test_rmdir_of_non_empty_merged_dir(drv):
    layer(drv, "l1", None, _base())
    mp = container(drv, "c", "l1")
    with pytest.raises(OSError) as ei:
        os.rmdir(mp / "lib")
    assert ei.value.errno == errno.ENOTEMPTY
    os.unlink(mp / "keep/k")
    os.rmdir(mp / "keep")
    assert not (mp / "keep").exists()


# ---------------------------------------------------------------------------
# copy-up


def test_copy_up_keeps_metadata_and_holes(drv):
    sparse_size = 64 << 20
    t = (LayerTar()
         .dir("d", mode=0o750, uid=7, gid=8, mtime=1_500_000_000, xattrs={"user.dir": b"d"})
         .file("d/f", b"content", mode=0o4755, uid=1000, gid=1001, mtime=1_600_000_000,
               xattrs={"user.note": b"\x00\xff", "security.capability": b"\x01\x00\x00\x02" + b"\x00" * 16})
         .symlink("d/l", "f", uid=3, gid=4, mtime=1_400_000_000)
         .fifo("d/p", mode=0o620, uid=5, gid=6))
    layer(drv, "l1", None, t)
    lower = drv.home / "l1" / "diff"
    with open(lower / "d" / "sparse", "wb") as f:  # a sparse file in the layer
        f.seek(sparse_size - 5)
        f.write(b"tail!")
    os.utime(lower / "d", ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))
    mp = container(drv, "c", "l1")
    before = {n: os.lstat(mp / "d" / n) for n in ("f", "l", "p", "sparse")}
    dir_before = os.lstat(mp / "d")
    # modifying operations that change nothing visible but force a copy-up
    os.utime(mp / "d/f", ns=(before["f"].st_atime_ns, before["f"].st_mtime_ns))
    os.lchown(mp / "d/l", 3, 4)
    os.chmod(mp / "d/p", 0o620)
    with open(mp / "d/sparse", "r+b"):
        pass
    upper = drv.home / "c" / "diff"
    for n in ("f", "l", "p", "sparse"):
        assert os.path.lexists(upper / "d" / n), f"{n} was not copied up"
        after = os.lstat(mp / "d" / n)
        assert after.st_ino == before[n].st_ino, f"{n}: inode number changed on copy-up"
        for field in ("st_mode", "st_uid", "st_gid", "st_size", "st_mtime_ns"):
            assert getattr(after, field) == getattr(before[n], field), f"{n}: {field}"
    assert (mp / "d/f").read_bytes() == b"content"
    assert os.getxattr(mp / "d/f", "user.note") == b"\x00\xff"
    assert os.getxattr(upper / "d/f", "security.capability").startswith(b"\x01\x00\x00\x02")
    assert os.readlink(mp / "d/l") == "f"
    st = os.lstat(upper / "d/sparse")
    assert st.st_blocks * 512 < 1 << 20, "the sparse file lost its holes"
    with open(mp / "d/sparse", "rb") as f:
        f.seek(sparse_size - 5)
        assert f.read() == b"tail!"
    # the parent directory was copied up first, with its own metadata
    dir_after = os.lstat(upper / "d")
    assert (stat.S_IMODE(dir_after.st_mode), dir_after.st_uid, dir_after.st_gid) == (0o750, 7, 8)
    assert dir_after.st_mtime_ns == dir_before.st_mtime_ns
    assert os.getxattr(upper / "d", "user.dir") == b"d"
    # only the copy-ups: no content change
    assert {c.path for c in drv.changes("c", "l1")} >= {"/d/f", "/d/sparse"}


def test_write_to_lower_file_then_read_from_old_handle(drv):
    layer(drv, "l1", None, LayerTar().file("f", b"old content"))
    mp = container(drv, "c", "l1")
    with open(mp / "f", "rb") as reader:
        with open(mp / "f", "r+b") as writer:
            writer.write(b"NEW")
        assert reader.read() == b"NEW content"
    assert (drv.home / "l1" / "diff" / "f").read_bytes() == b"old content"


def test_append_truncate_and_shared_mmap(drv):
    layer(drv, "l1", None, LayerTar().file("log", b"line1\n").file("big", b"x" * 100_000).file("m", b"0" * 8192))
    mp = container(drv, "c", "l1")
    with open(mp / "log", "ab") as f:
        f.write(b"line2\n")
    assert (mp / "log").read_bytes() == b"line1\nline2\n"
    with open(mp / "big", "r+b") as f:
        f.truncate(10)
    assert (mp / "big").read_bytes() == b"x" * 10
    fd = os.open(mp / "m", os.O_RDWR)
    try:
        with mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[0:5] = b"hello"
            m.flush()
    finally:
        os.close(fd)
    assert (mp / "m").read_bytes()[:6] == b"hello0"
    assert (drv.home / "c" / "diff" / "m").read_bytes()[:5] == b"hello"


# ---------------------------------------------------------------------------
# hardlinks


def _linked() -> LayerTar:
    return (LayerTar()
            .dir("a").dir("b")
            .file("a/x", b"shared", mode=0o640)
            .hardlink("b/y", "a/x")
            .hardlink("z", "a/x"))


def test_hardlinks_stay_one_file_across_copy_up(drv):
    layer(drv, "l1", None, _linked())
    mp = container(drv, "c", "l1")
    st = {p: os.lstat(mp / p) for p in ("a/x", "b/y", "z")}
    assert len({s.st_ino for s in st.values()}) == 1
    assert all(s.st_nlink == 3 for s in st.values())
    with open(mp / "b/y", "r+b") as f:  # copy-up of one name
        f.write(b"SHARED")
    for p in ("a/x", "b/y", "z"):
        s = os.lstat(mp / p)
        assert (mp / p).read_bytes() == b"SHARED", p
        assert s.st_ino == st["a/x"].st_ino, f"{p}: inode number changed"
        assert s.st_nlink == 3, p
    upper = drv.home / "c" / "diff"
    assert len({os.lstat(upper / p).st_ino for p in ("a/x", "b/y", "z")}) == 1
    os.unlink(mp / "z")
    assert os.lstat(mp / "a/x").st_nlink == 2
    os.link(mp / "a/x", mp / "w")
    assert os.lstat(mp / "w").st_ino == st["a/x"].st_ino
    assert os.lstat(mp / "b/y").st_nlink == 3
    # the export keeps them linked
    buf = io.BytesIO()
    drv.export("c", "l1", buf)
    import tarfile

    entries = {ti.name: ti for ti in tarfile.open(fileobj=io.BytesIO(buf.getvalue()))}
    assert sum(1 for ti in entries.values() if ti.islnk()) == 2


def test_deleting_a_lower_hardlink_name_lowers_the_count(drv):
    layer(drv, "l1", None, _linked())
    mp = container(drv, "c", "l1")
    os.unlink(mp / "z")
    assert os.lstat(mp / "a/x").st_nlink == 2
    assert not os.path.lexists(mp / "z")


def test_hardlink_whose_other_name_is_hidden(drv):
    layer(drv, "l1", None, _linked())
    layer(drv, "l2", "l1", LayerTar().whiteout("z"))
    mp = container(drv, "c", "l2")
    (mp / "a/x").write_bytes(b"changed")
    assert (mp / "b/y").read_bytes() == b"changed"
    assert not os.path.lexists(mp / "z")
    assert os.lstat(mp / "a/x").st_nlink == 2


# ---------------------------------------------------------------------------
# renames


def test_rename_cases(drv):
    layer(drv, "l1", None, _base())
    mp = container(drv, "c", "l1")
    ino = os.lstat(mp / "etc/passwd").st_ino
    os.rename(mp / "etc/passwd", mp / "keep/passwd")  # lower file moves: copy-up + whiteout
    assert not os.path.lexists(mp / "etc/passwd")
    assert (mp / "keep/passwd").read_bytes() == b"root:x:0:0\n"
    assert os.lstat(mp / "keep/passwd").st_ino == ino
    os.rename(mp / "keep/passwd", mp / "etc/hosts")  # over another lower file
    assert sorted(os.listdir(mp / "etc")) == ["hosts"]
    assert (mp / "etc/hosts").read_bytes() == b"root:x:0:0\n"
    # a directory with lower content: EXDEV (as overlayfs without redirect_dir)
    with pytest.raises(OSError) as ei:
        os.rename(mp / "lib", mp / "lib2")
    assert ei.value.errno == errno.EXDEV
    # mv falls back to copy + delete
    subprocess.run(["mv", str(mp / "lib"), str(mp / "lib2")], check=True)
    assert sorted(os.listdir(mp / "lib2")) == ["a", "b", "sub"] and not os.path.lexists(mp / "lib")
    # a directory made in the container renames, keeping its inode number
    os.makedirs(mp / "new/deep")
    (mp / "new/deep/f").write_bytes(b"f")
    ino = os.lstat(mp / "new/deep").st_ino
    os.rename(mp / "new", mp / "renamed")
    assert (mp / "renamed/deep/f").read_bytes() == b"f"
    assert os.lstat(mp / "renamed/deep").st_ino == ino
    # onto the place of a deleted lower directory: it must not merge with it
    shutil.rmtree(mp / "keep")
    os.rename(mp / "renamed", mp / "keep")
    assert os.listdir(mp / "keep") == ["deep"]
    # RENAME_NOREPLACE-like: rename over a non-empty directory fails
    os.mkdir(mp / "e1")
    os.mkdir(mp / "e2")
    (mp / "e2/x").write_bytes(b"")
    with pytest.raises(OSError) as ei:
        os.rename(mp / "e1", mp / "e2")
    assert ei.value.errno == errno.ENOTEMPTY
    drv.put("c")
    mp = drv.get("c")
    assert os.listdir(mp / "keep") == ["deep"]
    assert sorted(os.listdir(mp / "etc")) == ["hosts"]
    # the native diff agrees with comparing the two views
    _assert_native_equals_naive(drv, "c", "l1")


# ---------------------------------------------------------------------------
# native diff vs naive diff, and round trips through overlay2


def _assert_native_equals_naive(drv, id, parent):
    native = drv.changes(id, parent)
    naive = Driver.changes(drv, id, parent)
    assert native == naive


def _ops(mp: Path):
    """Changes of every kind to a container on _base() + _upper()."""
    (mp / "etc/passwd").write_bytes(b"changed\n")
    os.chmod(mp / "etc/new", 0o600)
    os.unlink(mp / "lib/only")
    os.makedirs(mp / "newdir/x")
    (mp / "newdir/x/f").write_bytes(b"f")
    os.symlink("../keep", mp / "etc/link")
    os.mkfifo(mp / "fifo")
    os.rename(mp / "keep/k", mp / "k-moved")
    shutil.rmtree(mp / "keep")
    os.mkdir(mp / "keep")
    (mp / "keep/again").write_bytes(b"again")
    os.setxattr(mp / "lib", "user.tag", b"t")
    os.link(mp / "etc/new", mp / "new-link")


def test_native_and_naive_diff_agree(drv):
    layer(drv, "l1", None, _base())
    layer(drv, "l2", "l1", _upper())
    mp = container(drv, "c", "l2")
    _ops(mp)
    drv.put("c")
    _assert_native_equals_naive(drv, "c", "l2")
    # and the export reproduces the container on the parent
    buf = io.BytesIO()
    diff_id = drv.export("c", "l2", buf)
    drv.create("again", "l2")
    result = drv.apply("again", "l2", io.BytesIO(buf.getvalue()))
    assert result.diff_id == diff_id
    assert_same_tree(drv.get("c"), drv.get("again", readonly=True), "export applied on the parent", mtimes=True)


def test_layers_move_between_aufs_and_overlay2(drv, tmp_path):
    from layerfs.drivers.overlay2 import Overlay2Driver

    try:
        ovl = Overlay2Driver(tmp_path / "ovl", {})
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"overlay2 unavailable here: {exc}")
    try:
        for d in (drv, ovl):
            layer(d, "l1", None, _base())
            layer(d, "l2", "l1", _upper())
        # aufs -> overlay2
        _ops(container(drv, "c", "l2"))
        buf = io.BytesIO()
        drv.export("c", "l2", buf)
        layer_from = buf.getvalue()
        ovl.create("from-aufs", "l2")
        ovl.apply("from-aufs", "l2", io.BytesIO(layer_from))
        ovl.finish_apply("from-aufs", archive.ApplyResult("", 0, "none"))
        assert_same_tree(drv.get("c"), ovl.get("from-aufs", readonly=True), "aufs container as an overlay2 layer")
        # overlay2 -> aufs
        ovl.create("oc", "l2", writable=True)
        _ops(ovl.get("oc"))
        buf = io.BytesIO()
        ovl.export("oc", "l2", buf)
        drv.create("from-ovl", "l2")
        drv.apply("from-ovl", "l2", io.BytesIO(buf.getvalue()))
        assert_same_tree(ovl.get("oc"), drv.get("from-ovl", readonly=True), "overlay2 container as an aufs layer")
    finally:
        for id in ovl.ids():
            ovl.put(id)


# ---------------------------------------------------------------------------
# programs and processes


def test_busybox_script_in_chroot(drv):
    busybox = shutil.which("busybox")
    if busybox is None or b"statically linked" not in subprocess.run(
            ["file", "-L", busybox], capture_output=True).stdout and not _is_static(busybox):
        pytest.skip("needs busybox-static (apt-get install busybox-static)")
    layer(drv, "l1", None, _base())
    mp = container(drv, "c", "l1")
    (mp / "bin").mkdir()
    shutil.copy2(busybox, mp / "bin/busybox")
    r = subprocess.run(["chroot", str(mp), "/bin/busybox", "--install", "-s", "/bin"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    script = r"""
set -e
cd /
mkdir -p /work/a
echo hello > /work/a/one
echo world >> /work/a/one
mv /work/a/one /work/a/two
cp /etc/passwd /work/pw
echo root2 >> /etc/passwd
rm /etc/hosts
rm -r /lib/sub
ln /work/a/two /work/hard
ln -s a/two /work/soft
for i in 1 2 3 4 5; do echo "line $i" > /work/f$i; done
rm /work/f3
grep -c line /work/f1 /work/f2 /work/f4 /work/f5 > /work/count
grep -q root2 /etc/passwd
test ! -e /etc/hosts
test "$(cat /work/soft)" = "hello
world"
ls /work | sort > /listing  # not in /work: sort may create it while ls runs
echo done
"""
    r = subprocess.run(["chroot", str(mp), "/bin/sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "done"
    assert (mp / "listing").read_text().split() == ["a", "count", "f1", "f2", "f4", "f5", "hard", "pw", "soft"]
    assert os.lstat(mp / "work/hard").st_ino == os.lstat(mp / "work/a/two").st_ino
    assert (mp / "etc/passwd").read_bytes() == b"root:x:0:0\nroot2\n"
    assert not (mp / "etc/hosts").exists()
    assert (drv.home / "l1" / "diff" / "etc" / "hosts").exists()


def _is_static(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return b"ld-linux" not in head and b"/lib64/ld" not in head


def test_concurrent_readers_and_writers(drv):
    layer(drv, "l1", None, LayerTar().dir("d").file("d/shared", b"s" * 100_000))
    mp = container(drv, "c", "l1")
    code = r"""
import os, sys
mp, i = sys.argv[1], int(sys.argv[2])
for n in range(50):
    p = os.path.join(mp, "d", f"w{i}-{n}")
    with open(p, "wb") as f:
        f.write(os.urandom(1000) + b"%d" % n)
    assert open(os.path.join(mp, "d", "shared"), "rb").read() == b"s" * 100000
    if n % 2:
        os.unlink(p)
os.rename(os.path.join(mp, "d", f"w{i}-0"), os.path.join(mp, "d", f"done{i}"))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(mp), str(i)]) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    names = set(os.listdir(mp / "d"))
    assert {f"done{i}" for i in range(4)} <= names
    assert len(names) == 1 + 4 * 25
    assert len(os.listdir(drv.home / "c" / "diff" / "d")) == 4 * 25


# ---------------------------------------------------------------------------
# the daemon


def test_mount_outlives_caller_and_put_stops_daemon(drv):
    layer(drv, "l1", None, _base())
    drv.create("c", "l1", writable=True)
    code = ("import sys; from pathlib import Path; from layerfs.drivers.aufs import AufsDriver; "
            "print(AufsDriver(Path(sys.argv[1]), {}).get('c'))")
    out = subprocess.run([sys.executable, "-c", code, str(drv.home)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    mp = Path(out.stdout.strip())
    assert drv.is_mounted("c") and (mp / "top").read_bytes() == b"top"
    pid = int((drv.home / "run" / "c.pid").read_text())
    drv.put("c")
    assert not drv.is_mounted("c")
    assert not _running(pid)
    assert "unmounted" in (drv.home / "run" / "c.log").read_text()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_daemon_killed_then_next_get_works(drv):
    layer(drv, "l1", None, _base())
    mp = container(drv, "c", "l1")
    with open(mp / "durable", "wb") as f:
        f.write(b"fsynced data")
        f.flush()
        os.fsync(f.fileno())
    pid = int((drv.home / "run" / "c.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not _running(pid):
            break
        time.sleep(0.01)
    with pytest.raises(OSError) as ei:
        os.stat(mp / "durable")
    assert ei.value.errno == errno.ENOTCONN
    assert drv.status()["dead_mounts"] == ["c"]
    assert any("dead" in p for p in drv.cleanup(repair=False, deep=True))
    mp = drv.get("c")  # notices the dead mount, detaches it, mounts again
    assert (mp / "durable").read_bytes() == b"fsynced data"
    assert (mp / "top").read_bytes() == b"top"
    assert drv.status()["dead_mounts"] == []
    # is_mounted also cleans up a dead mount
    os.kill(int((drv.home / "run" / "c.pid").read_text()), signal.SIGKILL)
    time.sleep(0.2)
    assert not drv.is_mounted("c")
    assert drv.status()["dead_mounts"] == []


def test_mount_failure_names_the_log(drv):
    layer(drv, "l1", None, _base())
    drv.create("c", "l1", writable=True)
    shutil.rmtree(drv.home / "l1" / "diff")  # a branch is missing: the daemon refuses
    from layerfs.errors import DriverUnavailable

    with pytest.raises(DriverUnavailable) as ei:
        drv.get("c")
    assert "c.log" in str(ei.value) and "not a directory" in str(ei.value)
    assert not drv.is_mounted("c")


def test_inode_numbers_are_stable_and_devices_distinct(drv):
    layer(drv, "l1", None, _base())
    mp = container(drv, "c", "l1")
    view = drv.get("l1", readonly=True)
    assert os.lstat(mp).st_dev != os.lstat(view).st_dev
    inos = {p: os.lstat(mp / p).st_ino for p in ("etc", "etc/passwd", "lib/sub/c", "top")}
    assert len(set(inos.values())) == len(inos)
    (mp / "etc/passwd").write_bytes(b"x")  # copy-up of the file and its directory
    os.chmod(mp / "lib/sub/c", 0o600)
    # drop the kernel's caches: numbers come from the daemon's table again
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    assert {p: os.lstat(mp / p).st_ino for p in inos} == inos


# ---------------------------------------------------------------------------
# the union module, property-tested against a flattened reference

_NAMES = ("a", "b", "c")
_entry = hst.tuples(
    hst.lists(hst.sampled_from(_NAMES), min_size=1, max_size=3).map("/".join),
    hst.sampled_from(["file", "dir", "whiteout", "opaque", "symlink"]),
)


def _layer_tar(entries, index: int) -> bytes:
    t = LayerTar()
    made: dict[str, str] = {}
    for i, (path, kind) in enumerate(entries):
        parts = path.split("/")
        ok = True
        for k in range(1, len(parts)):
            parent = "/".join(parts[:k])
            if made.get(parent, "dir") != "dir":
                ok = False
                break
            if parent not in made:
                t.dir(parent)
                made[parent] = "dir"
        if not ok or path in made:
            continue
        if kind == "file":
            # never the same size twice: the naive diff sees only stat changes
            t.file(path, f"{path}-{i}".encode() + b"+" * index)
        elif kind == "dir":
            t.dir(path)
        elif kind == "symlink":
            t.symlink(path, f"target-{index}-{i}")
        elif kind == "whiteout":
            t.whiteout(path)
        else:
            t.dir(path).opaque(path)
        made[path] = "dir" if kind in ("dir", "opaque") else kind
    return t.bytes()


def _union_tree(u, rel="") -> dict:
    out = {}
    for name, branch in sorted(u.entries(rel).items()):
        child = rel + "/" + name
        path = u.branches[branch] + child
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            out[child] = "dir"
            out.update(_union_tree(u, child))
        elif stat.S_ISLNK(st.st_mode):
            out[child] = "-> " + os.readlink(path)
        else:
            out[child] = open(path, "rb").read()
        assert u.lstat(child) is not None and stat.S_IFMT(u.lstat(child).st_mode) == stat.S_IFMT(st.st_mode)
    return out


def _flat_tree(root, rel="") -> dict:
    out = {}
    for name in sorted(os.listdir(root + rel or "/")):
        child = rel + "/" + name
        st = os.lstat(root + child)
        if stat.S_ISDIR(st.st_mode):
            out[child] = "dir"
            out.update(_flat_tree(root, child))
        elif stat.S_ISLNK(st.st_mode):
            out[child] = "-> " + os.readlink(root + child)
        else:
            out[child] = open(root + child, "rb").read()
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hst.lists(hst.lists(_entry, max_size=6), min_size=1, max_size=4))
def test_union_matches_flattened_layers(tmp_path_factory, layers):
    from layerfs.drivers.aufs.union import Union

    work = tmp_path_factory.mktemp("union")
    flat = work / "flat"
    flat.mkdir()
    branches = []
    for i, entries in enumerate(layers):
        data = _layer_tar(entries, i)
        b = work / f"b{i}"
        b.mkdir()
        archive.apply_tar(io.BytesIO(data), b, archive.WhiteoutFormat.AUFS)
        archive.apply_tar(io.BytesIO(data), flat, archive.WhiteoutFormat.DELETE)
        branches.insert(0, str(b))
    u = Union(branches)
    assert _union_tree(u) == _flat_tree(str(flat))
    # and the native diff of the top branch over the others agrees with the naive one
    from layerfs.drivers.aufs import aufs_changes

    if len(branches) > 1:
        below = work / "below"
        below.mkdir()
        for i, entries in enumerate(layers[:-1]):
            archive.apply_tar(io.BytesIO(_layer_tar(entries, i)), below, archive.WhiteoutFormat.DELETE)
        assert aufs_changes(branches[0], Union(branches[1:])) == tree_changes(str(flat), str(below))
