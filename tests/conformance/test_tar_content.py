"""What a registered layer tar looks like once mounted: every kind of entry and
its metadata (modes incl. setuid/setgid/sticky, owners, mtimes, devices,
fifos, hardlinks, xattrs incl. security.capability, long names), and how OCI
whiteouts and opaque directories hide lower content."""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest

from conformance import mounted, node, register_bytes, register_chain, snapshot
from tarbuild import LayerTar

MTIME = 1_234_567_890


def _caps(*bits: int) -> bytes:
    """A VFS_CAP_REVISION_2 security.capability value with *bits* permitted+effective."""
    lo = hi = 0
    for b in bits:
        if b < 32:
            lo |= 1 << b
        else:
            hi |= 1 << (b - 32)
    VFS_CAP_REVISION_2, VFS_CAP_FLAGS_EFFECTIVE = 0x02000000, 0x000001
    return struct.pack("<IIIII", VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, lo, 0, hi, 0)


CAP_SETUID, CAP_NET_BIND_SERVICE, CAP_NET_RAW = 7, 10, 13


@pytest.fixture
def views(store):
    """Yield (read-only layer view, container view) of a registered layer tar."""
    opened = []

    def _views(data: bytes, parent=None):
        layer = register_bytes(store, data, parent=parent)
        name = f"ctr-{len(opened)}"
        store.create_container(name, layer.chain_id)
        ro = store.mount(layer.chain_id)
        opened.append(layer.chain_id)
        rw = store.mount(name)
        opened.append(name)
        return layer, ro, rw

    yield _views
    for ref in reversed(opened):
        store.unmount(ref)


def test_modes_owners_and_special_bits(views):
    data = (LayerTar()
            .dir("bin", mode=0o755)
            .file("bin/su", b"su", mode=0o4755, uid=0, gid=0)
            .file("bin/user-setuid", b"u", mode=0o4750, uid=1000, gid=1000)
            .file("bin/wall", b"w", mode=0o2755, uid=0, gid=5)
            .file("bin/noperm", b"n", mode=0o000)
            .file("bin/writeonly", b"Some data", mode=0o4222)
            .dir("tmp", mode=0o1777)
            .dir("home", mode=0o755)
            .dir("home/user", mode=0o700, uid=1000, gid=1000)
            .file("home/user/.profile", b"p", mode=0o600, uid=1000, gid=1000)
            .dir("a subdir", mode=0o1705, uid=1, gid=2)
            .file("big-ids", b"", uid=165536, gid=2_100_000)
            .bytes())
    _, ro, rw = views(data)
    expected = {
        "bin/su": (0o4755, 0, 0),
        "bin/user-setuid": (0o4750, 1000, 1000),
        "bin/wall": (0o2755, 0, 5),
        "bin/noperm": (0o000, 0, 0),
        "bin/writeonly": (0o4222, 0, 0),
        "tmp": (0o1777, 0, 0),
        "home/user": (0o700, 1000, 1000),
        "home/user/.profile": (0o600, 1000, 1000),
        "a subdir": (0o1705, 1, 2),
        "big-ids": (0o644, 165536, 2_100_000),
    }
    for root in (ro, rw):
        for path, (mode, uid, gid) in expected.items():
            st = os.lstat(root / path)
            assert (oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid) == \
                (oct(mode), uid, gid), f"{path} in {root}"


def test_file_content_and_mtime(views):
    content = os.urandom(300_000)
    data = (LayerTar()
            .dir("d", mtime=MTIME)
            .file("d/random", content, mtime=MTIME + 1)
            .file("d/empty", b"", mtime=MTIME + 2)
            .symlink("d/link", "random", mtime=MTIME + 3)
            .bytes())
    _, ro, rw = views(data)
    for root in (ro, rw):
        assert (root / "d/random").read_bytes() == content
        assert int(os.lstat(root / "d/random").st_mtime) == MTIME + 1
        assert int(os.lstat(root / "d/empty").st_mtime) == MTIME + 2
        assert os.lstat(root / "d/empty").st_size == 0
        # directory mtimes are restored after their children were written
        assert int(os.lstat(root / "d").st_mtime) == MTIME


def test_symlinks(views):
    long_target = "/" + "/".join(["very-long-directory-name"] * 8) + "/target"
    data = (LayerTar()
            .dir("lib")
            .file("lib/libc.so.6", b"ELF")
            .symlink("lib/libc.so", "libc.so.6")
            .symlink("abs", "/lib/libc.so.6")
            .symlink("dangling", "does/not/exist")
            .symlink("long", long_target)
            .symlink("dirlink", "lib")
            .bytes())
    _, ro, rw = views(data)
    for root in (ro, rw):
        assert os.readlink(root / "lib/libc.so") == "libc.so.6"
        assert os.readlink(root / "abs") == "/lib/libc.so.6"
        assert os.readlink(root / "dangling") == "does/not/exist"
        assert os.readlink(root / "long") == long_target
        assert os.readlink(root / "dirlink") == "lib"
        assert (root / "lib/libc.so").read_bytes() == b"ELF"


def test_long_paths(views):
    deep = "/".join(f"directory-number-{i:02d}" for i in range(8))
    name = deep + "/" + "f" * 200
    assert len(name) > 255
    data = LayerTar()
    parts = deep.split("/")
    for i in range(1, len(parts) + 1):
        data.dir("/".join(parts[:i]))
    data.file(name, b"long")
    _, ro, rw = views(data.bytes())
    for root in (ro, rw):
        assert (root / name).read_bytes() == b"long"


def test_missing_parent_directories_are_created(views):
    data = LayerTar().file("usr/share/doc/README", b"doc").bytes()
    _, ro, rw = views(data)
    for root in (ro, rw):
        assert (root / "usr/share/doc/README").read_bytes() == b"doc"
        assert (root / "usr/share").is_dir()


def test_device_nodes_and_fifos(views):
    data = (LayerTar()
            .dir("dev")
            .chardev("dev/null", 1, 3, mode=0o666)
            .chardev("dev/tty5", 4, 5, mode=0o620, gid=5)
            .blockdev("dev/loop7", 7, 7, mode=0o660, gid=6)
            .fifo("dev/initctl", mode=0o600)
            .bytes())
    _, ro, rw = views(data)
    for root in (ro, rw):
        st = os.lstat(root / "dev/null")
        assert stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
        st = os.lstat(root / "dev/tty5")
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (4, 5)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o620, 5)
        st = os.lstat(root / "dev/loop7")
        assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 7)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, 6)
        st = os.lstat(root / "dev/initctl")
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_device_node_is_usable_in_container(views):
    _, _, rw = views(LayerTar().dir("dev").chardev("dev/null", 1, 3).bytes())
    with open(rw / "dev/null", "wb") as f:
        f.write(b"discarded")
    assert (rw / "dev/null").read_bytes() == b""


def test_hardlinks_share_an_inode(views):
    data = (LayerTar()
            .dir("a").dir("b")
            .file("a/x", b"shared content", mode=0o640, uid=7, gid=8)
            .hardlink("b/y", "a/x")
            .hardlink("z", "a/x")
            .file("lonely", b"1")
            .bytes())
    layer, ro, rw = views(data)
    assert layer.size in (len(b"shared content") + 1, 3 * len(b"shared content") + 1)
    for root in (ro, rw):
        sx, sy, sz = (os.lstat(root / p) for p in ("a/x", "b/y", "z"))
        assert sx.st_ino == sy.st_ino == sz.st_ino, f"hardlinks split in {root}"
        assert sx.st_dev == sy.st_dev == sz.st_dev
        assert sx.st_nlink == 3
        assert (root / "b/y").read_bytes() == b"shared content"
        assert (stat.S_IMODE(sy.st_mode), sy.st_uid, sy.st_gid) == (0o640, 7, 8)
        assert os.lstat(root / "lonely").st_nlink == 1


def test_hardlink_to_symlink(views):
    data = (LayerTar()
            .symlink("sl", "target")
            .hardlink("sl2", "sl")
            .bytes())
    _, ro, _ = views(data)
    assert os.readlink(ro / "sl2") == "target"
    assert os.lstat(ro / "sl").st_ino == os.lstat(ro / "sl2").st_ino


@pytest.mark.parametrize("xattr_name,value", [
    ("user.comment", b"hello world"),
    ("user.binary", bytes(range(256))),
    ("security.capability", _caps(CAP_NET_BIND_SERVICE, CAP_NET_RAW)),
    ("security.capability", _caps(CAP_SETUID)),
], ids=["user-text", "user-binary", "capability-ascii", "capability-setuid"])
def test_xattrs_survive_register_and_mount(views, xattr_name, value):
    data = (LayerTar()
            .dir("usr", xattrs={"user.dirattr": b"on a dir"})
            .file("usr/ping", b"\x7fELF", mode=0o755, xattrs={xattr_name: value})
            .bytes())
    _, ro, rw = views(data)
    for root in (ro, rw):
        assert os.getxattr(root / "usr/ping", xattr_name) == value
        assert os.getxattr(root / "usr", "user.dirattr") == b"on a dir"
        assert stat.S_IMODE(os.lstat(root / "usr/ping").st_mode) == 0o755


def test_capability_and_setuid_together(views):
    data = (LayerTar()
            .file("newuidmap", b"bin", mode=0o4755, uid=0, gid=0,
                  xattrs={"security.capability": _caps(CAP_SETUID)})
            .bytes())
    _, ro, rw = views(data)
    for root in (ro, rw):
        assert os.getxattr(root / "newuidmap", "security.capability") == _caps(CAP_SETUID)
        assert stat.S_IMODE(os.lstat(root / "newuidmap").st_mode) == 0o4755


def test_root_of_layer_is_0755_when_tar_has_no_root_entry(views):
    _, ro, rw = views(LayerTar().file("f", b"").bytes())
    for root in (ro, rw):
        st = os.stat(root)
        assert stat.S_IMODE(st.st_mode) == 0o755
        assert (st.st_uid, st.st_gid) == (0, 0)


def test_root_entry_metadata_is_ignored(views):
    # A './' entry does not change the layer root (containerd's applier skips
    # it; moby's UnpackLayer applies it): a container root stays 0755 root:root
    # even when an image tar was made from a 0700 directory.
    _, ro, rw = views(LayerTar().dir("./", mode=0o700).file("f", b"").bytes())
    for root in (ro, rw):
        st = os.stat(root)
        assert stat.S_IMODE(st.st_mode) == 0o755
        assert (st.st_uid, st.st_gid) == (0, 0)
        assert (root / "f").exists()


# ---------------------------------------------------------------------------
# whiteouts and opaque directories across registered layers


def _lower() -> bytes:
    return (LayerTar()
            .dir("a")
            .file("a/gone", b"1")
            .file("a/kept", b"2")
            .dir("b")
            .dir("b/sub")
            .file("b/sub/deep", b"3")
            .dir("c")
            .file("c/old1", b"4")
            .dir("c/olddir")
            .file("c/olddir/x", b"5")
            .dir("d")
            .file("d/old", b"6")
            .file("top-file", b"7")
            .bytes())


def test_whiteouts_hide_lower_entries(store):
    upper = (LayerTar()
             .dir("a").whiteout("a/gone")
             .whiteout("b")
             .whiteout("top-file")
             .whiteout("never-existed")
             .bytes())
    lower, top = register_chain(store, [_lower(), upper])
    with mounted(store, top.chain_id) as mp:
        assert not os.path.lexists(mp / "a/gone")
        assert (mp / "a/kept").read_bytes() == b"2"
        assert not os.path.lexists(mp / "b")
        assert not os.path.lexists(mp / "top-file")
        assert not os.path.lexists(mp / "never-existed")
        names = set(os.listdir(mp)) - {"lost+found"}
        assert names == {"a", "c", "d"}
        assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(mp) for n in ds + fs)
    with mounted(store, lower.chain_id) as mp:
        assert (mp / "a/gone").exists() and (mp / "b/sub/deep").exists()


@pytest.mark.parametrize("marker_first", [True, False], ids=["opq-first", "opq-last"])
def test_opaque_directory_hides_only_lower_content(store, marker_first):
    upper = LayerTar().dir("c")
    if marker_first:
        upper.opaque("c").file("c/new", b"new").dir("c/newdir")
    else:
        upper.file("c/new", b"new").dir("c/newdir").opaque("c")
    lower, top = register_chain(store, [_lower(), upper.bytes()])
    with mounted(store, top.chain_id) as mp:
        assert sorted(os.listdir(mp / "c")) == ["new", "newdir"]
        assert (mp / "c/new").read_bytes() == b"new"
        assert (mp / "d/old").exists()
        assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(mp) for n in ds + fs)
    with mounted(store, lower.chain_id) as mp:
        assert sorted(os.listdir(mp / "c")) == ["old1", "olddir"]


def test_whiteout_then_recreate_in_next_layer(store):
    l2 = LayerTar().whiteout("b").bytes()
    l3 = LayerTar().dir("b", mode=0o700).file("b/fresh", b"f").bytes()
    _, _, top = register_chain(store, [_lower(), l2, l3])
    with mounted(store, top.chain_id) as mp:
        assert os.listdir(mp / "b") == ["fresh"]
        assert stat.S_IMODE(os.stat(mp / "b").st_mode) == 0o700


def test_type_changes_across_layers(store):
    l2 = (LayerTar()
          .whiteout("b").file("b", b"now a file")      # dir -> file
          .whiteout("top-file").dir("top-file")         # file -> dir
          .file("top-file/inside", b"i")
          .dir("d").whiteout("d/old").symlink("d/old", "/elsewhere")  # file -> symlink
          .bytes())
    _, top = register_chain(store, [_lower(), l2])
    with mounted(store, top.chain_id) as mp:
        assert (mp / "b").read_bytes() == b"now a file"
        assert (mp / "top-file/inside").read_bytes() == b"i"
        assert os.readlink(mp / "d/old") == "/elsewhere"


def test_file_replaced_in_upper_layer_without_whiteout(store):
    l2 = (LayerTar()
          .dir("a").file("a/kept", b"replaced", mode=0o600, uid=3)
          .bytes())
    _, top = register_chain(store, [_lower(), l2])
    with mounted(store, top.chain_id) as mp:
        st = os.lstat(mp / "a/kept")
        assert (mp / "a/kept").read_bytes() == b"replaced"
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 3)
        assert (mp / "a/gone").read_bytes() == b"1"


def test_read_only_view_and_container_agree(store):
    lower, top = register_chain(store, [_lower(), LayerTar().whiteout("c").bytes()])
    store.create_container("c1", top.chain_id)
    with mounted(store, top.chain_id) as ro, mounted(store, "c1") as rw:
        assert snapshot(ro) == snapshot(rw)
        assert node(ro) == node(rw)


def test_view_of_layer_is_read_only(store):
    layer = register_bytes(store, _lower())
    with mounted(store, layer.chain_id) as mp:
        attempts = [
            lambda: (mp / "new-file").write_bytes(b"x"),
            lambda: open(mp / "a/kept", "ab").close(),
            lambda: os.mkdir(mp / "newdir"),
            lambda: os.unlink(mp / "a/kept"),
            lambda: os.chmod(mp / "a/kept", 0o777),
            lambda: os.rename(mp / "a/kept", mp / "a/moved"),
            lambda: os.symlink("x", mp / "sl"),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as ei:
                attempt()
            assert ei.value.errno == errno.EROFS
        assert (mp / "a/kept").read_bytes() == b"2"


# ---------------------------------------------------------------------------
# unusual names

ODD_NAMES = [
    "with space",
    "tab\tand\nnewline",
    "unicode-\u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9-\u65e5\u672c",
    b"latin1-\xe9t\xe9".decode("utf-8", "surrogateescape"),   # not valid UTF-8
    "back\\slash",
    "-leading-dash",
    "trailing-dot.",
    "...three-dots",
    "x" * 255,
]


def test_unusual_file_names(views):
    t = LayerTar().dir("odd")
    for i, n in enumerate(ODD_NAMES):
        t.file(f"odd/{n}", f"{i}".encode())
    _, ro, rw = views(t.bytes())
    for root in (ro, rw):
        got = sorted(os.listdir(os.fsencode(root / "odd")))
        assert got == sorted(os.fsencode(n) for n in ODD_NAMES)
        for i, n in enumerate(ODD_NAMES):
            assert (root / "odd" / n).read_bytes() == f"{i}".encode()


# ---------------------------------------------------------------------------
# tar semantics: pax times, repeated entries


def test_pax_subsecond_mtimes(views):
    t = LayerTar()
    t.dir("d")
    t.file("d/f", b"x")
    t.symlink("d/l", "f")
    # pax 'mtime' records carry nanoseconds
    for info, _ in t._entries:
        info.pax_headers["mtime"] = "1700000000.123456789"
    _, ro, rw = views(t.bytes())
    for root in (ro, rw):
        assert os.lstat(root / "d/f").st_mtime_ns == 1_700_000_000_123_456_789
        assert os.lstat(root / "d/l").st_mtime_ns == 1_700_000_000_123_456_789
        assert os.lstat(root / "d").st_mtime_ns == 1_700_000_000_123_456_789


def test_repeated_entries_later_wins(views):
    data = (LayerTar()
            .file("f", b"first", mode=0o600)
            .file("f", b"second", mode=0o644)
            .dir("was-dir").file("was-dir/child", b"c")
            .file("was-dir", b"now a file")
            .file("was-file", b"file")
            .dir("was-file", mode=0o700)
            .symlink("link", "a")
            .symlink("link", "b")
            .bytes())
    _, ro, rw = views(data)
    for root in (ro, rw):
        assert (root / "f").read_bytes() == b"second"
        assert stat.S_IMODE(os.lstat(root / "f").st_mode) == 0o644
        assert (root / "was-dir").read_bytes() == b"now a file"
        assert (root / "was-file").is_dir()
        assert stat.S_IMODE(os.lstat(root / "was-file").st_mode) == 0o700
        assert os.readlink(root / "link") == "b"


def test_repeated_directory_entry_merges_and_updates_metadata(views):
    data = (LayerTar()
            .dir("d", mode=0o755)
            .file("d/a", b"a")
            .dir("d", mode=0o700, uid=3, gid=4)
            .file("d/b", b"b")
            .bytes())
    _, ro, rw = views(data)
    for root in (ro, rw):
        assert sorted(os.listdir(root / "d")) == ["a", "b"]
        st = os.lstat(root / "d")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 3, 4)
