"""changes(), export_diff() and commit(): what a container changed, as a list
like `docker diff` and as an OCI layer tar, and the round trip
container -> export_diff -> register on the parent -> same view."""

from __future__ import annotations

import io
import os
import stat
import struct

import pytest

from conformance import (apply_ops, append_file, assert_same_tree, changes_of, chmod, chown,
                         create_dir, create_file, link, mknod, mounted, register_bytes, remove_all,
                         rename, set_xattr, symlink)
from tarbuild import LayerTar, normalize_name, read_entries, sha256_digest


def _base_tar() -> bytes:
    return (LayerTar()
            .dir("etc")
            .file("etc/passwd", b"root:x:0:0\n")
            .file("etc/hosts", b"127.0.0.1 localhost\n")
            .dir("etc/sub")
            .file("etc/sub/file", b"sub")
            .dir("usr").dir("usr/bin")
            .file("usr/bin/tool", b"tool", mode=0o755)
            .dir("var").dir("var/lib").dir("var/lib/old").dir("var/lib/old/inner")
            .file("var/lib/old/a", b"a")
            .file("var/lib/old/inner/b", b"b")
            .dir("opt")
            .file("opt/x", b"x")
            .dir("data")
            .file("data/keep", b"keep")
            .file("data/remove", b"remove")
            .dir("lib")
            .file("lib/hidden", b"h")
            .file("lib/also-hidden", b"h2")
            .bytes())


@pytest.fixture
def base(store):
    return register_bytes(store, _base_tar())


def _container(store, name, parent, ops):
    store.create_container(name, parent)
    with mounted(store, name) as mp:
        apply_ops(mp, ops)


def _export(store, name) -> tuple[str, bytes]:
    buf = io.BytesIO()
    diff_id = store.export_diff(name, buf)
    return diff_id, buf.getvalue()


# ---------------------------------------------------------------------------
# changes()


def test_changes_new_container_is_empty(store, base):
    store.create_container("c", base.chain_id)
    assert changes_of(store, "c") == []


def test_changes_kinds(store, base):
    _container(store, "c", base.chain_id, [
        append_file("/etc/passwd", b"user:x:1000:1000\n"),      # modify a file
        create_file("/etc/sub/new", b"new"),                    # add into an existing dir
        create_dir("/newdir/a/b"), create_file("/newdir/a/b/file", b"f"),  # new tree
        remove_all("/var/lib/old"),                             # delete a whole dir
        chmod("/opt/x", 0o600),                                 # metadata-only change
        remove_all("/data/remove"),                             # delete a file
    ])
    expected = [
        ("/data", "C"),
        ("/data/remove", "D"),
        ("/etc", "C"),
        ("/etc/passwd", "C"),
        ("/etc/sub", "C"),
        ("/etc/sub/new", "A"),
        ("/newdir", "A"),
        ("/newdir/a", "A"),
        ("/newdir/a/b", "A"),
        ("/newdir/a/b/file", "A"),
        ("/opt", "C"),
        ("/opt/x", "C"),
        ("/var", "C"),
        ("/var/lib", "C"),
        ("/var/lib/old", "D"),
    ]
    got = changes_of(store, "c")
    assert sorted(got) == expected
    assert [p for p, _ in got] == sorted(p for p, _ in got), "changes are not sorted by path"


def test_changes_same_mounted_and_unmounted(store, base):
    store.create_container("c", base.chain_id)
    with mounted(store, "c") as mp:
        apply_ops(mp, [create_file("/etc/hosts", b"changed"), remove_all("/opt/x"),
                       create_file("/added", b"a")])
        while_mounted = changes_of(store, "c")
    assert changes_of(store, "c") == while_mounted
    assert sorted(while_mounted) == [("/added", "A"), ("/etc", "C"), ("/etc/hosts", "C"),
                                     ("/opt", "C"), ("/opt/x", "D")]


def test_changes_without_parent_are_all_added(store):
    _container(store, "c", None, [
        create_dir("/a/b"), create_file("/a/b/f", b"f"), symlink("a/b/f", "/link"),
        mknod("/fifo", stat.S_IFIFO | 0o644),
    ])
    assert changes_of(store, "c") == [("/a", "A"), ("/a/b", "A"), ("/a/b/f", "A"),
                                      ("/fifo", "A"), ("/link", "A")]


def test_changes_opaque_directory(store, base):
    # rm -rf /lib && mkdir /lib && touch /lib/new: the overlay way makes /lib opaque
    _container(store, "c", base.chain_id, [
        remove_all("/lib"), create_dir("/lib"), create_file("/lib/new", b"n"),
    ])
    assert sorted(changes_of(store, "c")) == [
        ("/lib", "C"), ("/lib/also-hidden", "D"), ("/lib/hidden", "D"), ("/lib/new", "A"),
    ]


def test_changes_move_file_from_lower_layer(store, base):
    _container(store, "c", base.chain_id, [
        rename("/etc/sub/file", "/opt/moved"),
    ])
    assert sorted(changes_of(store, "c")) == [
        ("/etc", "C"), ("/etc/sub", "C"), ("/etc/sub/file", "D"),
        ("/opt", "C"), ("/opt/moved", "A"),
    ]


def test_changes_chown_directory(store, base):
    _container(store, "c", base.chain_id, [chown("/usr/bin", 1, 1)])
    assert sorted(changes_of(store, "c")) == [("/usr", "C"), ("/usr/bin", "C")]


def test_changes_replace_deleted_file_with_new_file(store, base):
    _container(store, "c", base.chain_id, [
        remove_all("/data/keep"), create_file("/data/keep", b"other"),
    ])
    assert sorted(changes_of(store, "c")) == [("/data", "C"), ("/data/keep", "C")]


def test_changes_deep_chain(store, base):
    child = register_bytes(store, LayerTar().dir("etc").file("etc/child", b"c")
                           .whiteout("opt").bytes(), parent=base.chain_id)
    _container(store, "c", child.chain_id, [
        remove_all("/etc/child"),              # from the direct parent
        remove_all("/etc/passwd"),             # from the grandparent
        create_dir("/opt"),                    # was deleted by the parent: new
    ])
    assert sorted(changes_of(store, "c")) == [
        ("/etc", "C"), ("/etc/child", "D"), ("/etc/passwd", "D"), ("/opt", "A"),
    ]


# ---------------------------------------------------------------------------
# export_diff()


def test_export_diff_returns_digest_of_tar(store, base):
    _container(store, "c", base.chain_id, [create_file("/etc/new", b"n")])
    diff_id, data = _export(store, "c")
    assert diff_id == sha256_digest(data)
    # a plain (uncompressed) tar that Python can read, holding the new file
    entries = {normalize_name(ti.name): ti for ti in read_entries(data)}
    assert entries["etc/new"].isfile() and entries["etc/new"].size == 1


def test_export_diff_is_deterministic(store, base):
    _container(store, "c", base.chain_id, [
        create_file("/etc/new", b"n"), remove_all("/opt/x"), create_dir("/z/y"),
    ])
    d1, b1 = _export(store, "c")
    d2, b2 = _export(store, "c")
    with mounted(store, "c"):
        d3, _ = _export(store, "c")
    assert d1 == d2 == d3
    assert b1 == b2


def test_export_diff_entries(store, base):
    _container(store, "c", base.chain_id, [
        append_file("/etc/passwd", b"more\n"),
        create_file("/etc/sub/new", b"new"),
        remove_all("/var/lib/old"),
        remove_all("/data/remove"),
        remove_all("/lib"), create_dir("/lib"), create_file("/lib/new", b"n"),
    ])
    _, data = _export(store, "c")
    entries = {normalize_name(ti.name): ti for ti in read_entries(data)}
    names = set(entries)
    # changed and added content is there, with its content
    for path, content in (("etc/passwd", b"root:x:0:0\nmore\n"), ("etc/sub/new", b"new"),
                          ("lib/new", b"n")):
        assert path in names
        assert entries[path].isfile() and entries[path].size == len(content)
    # parents of changes are there as directories
    for d in ("etc", "etc/sub", "var/lib", "data", "lib"):
        assert d in names and entries[d].isdir(), d
    # deletions are OCI whiteouts; a deleted dir is one whiteout, nothing below it
    assert "var/lib/.wh.old" in names
    assert not any(n.startswith("var/lib/old/") for n in names)
    assert "data/.wh.remove" in names
    assert "lib/.wh..wh..opq" in names or {"lib/.wh.hidden", "lib/.wh.also-hidden"} <= names
    # unchanged content is not exported
    for n in ("etc/hosts", "usr/bin/tool", "data/keep", "opt/x", "etc/sub/file"):
        assert n not in names, n
    # no overlay-internal representation leaks out
    for ti in entries.values():
        assert not (ti.ischr() and ti.devmajor == 0 and ti.devminor == 0), ti.name
        assert not any("overlay" in k for k in ti.pax_headers), ti.name
        assert not normalize_name(ti.name).startswith(("..", "/"))


def test_export_diff_of_unchanged_container_registers_as_parent_view(store, base):
    store.create_container("c", base.chain_id)
    diff_id, data = _export(store, "c")
    layer = register_bytes(store, data, parent=base.chain_id)
    assert layer.diff_id == diff_id
    with mounted(store, layer.chain_id) as a, mounted(store, base.chain_id) as b:
        assert_same_tree(b, a, "empty diff on the parent")


# ---------------------------------------------------------------------------
# commit round trip


def _caps_setuid() -> bytes:
    return struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0)


ROUND_TRIP_OPS = [
    append_file("/etc/passwd", b"user:x:1000:1000\n"),
    create_file("/etc/sub/new", b"new", 0o640), chown("/etc/sub/new", 1000, 1000),
    create_file("/usr/bin/suid", b"suid", 0o755), chown("/usr/bin/suid", 0, 0),
    chmod("/usr/bin/suid", 0o4755),
    create_file("/usr/bin/sgid", b"sgid", 0o755), chown("/usr/bin/sgid", 0, 50),
    chmod("/usr/bin/sgid", 0o2711),
    create_dir("/tmp"), chmod("/tmp", 0o1777),
    create_dir("/home/user/.cache", 0o700), chown("/home/user", 1000, 1000),
    chown("/home/user/.cache", 1000, 1000),
    create_file("/bin-cap", b"ping", 0o755),
    set_xattr("/bin-cap", "security.capability", _caps_setuid()),
    set_xattr("/etc/hosts", "user.note", b"\x00\xffbinary note"),
    create_dir("/hl"),
    create_file("/hl/a", b"linked", 0o600),
    link("/hl/a", "/hl/b"),
    symlink("../usr/bin/tool", "/hl/sym"),
    symlink("/nowhere", "/dangling"),
    mknod("/dev-null", stat.S_IFCHR | 0o666, 1, 3),
    mknod("/blk", stat.S_IFBLK | 0o600, 7, 9),
    mknod("/pipe", stat.S_IFIFO | 0o620),
    remove_all("/var/lib/old"),
    remove_all("/data/remove"),
    remove_all("/lib"), create_dir("/lib", 0o700), create_file("/lib/new", b"n"),
    rename("/etc/sub/file", "/opt/moved"),
    chmod("/opt/x", 0o444), chown("/opt/x", 5, 6),
    create_file("/big", os.urandom(3 << 20)),
]


def test_commit_round_trip(store, base):
    _container(store, "c", base.chain_id, ROUND_TRIP_OPS)
    diff_id, data = _export(store, "c")
    layer = register_bytes(store, data, parent=base.chain_id)
    assert layer.diff_id == diff_id
    assert layer.parent == base.chain_id
    with mounted(store, "c") as ctr, mounted(store, layer.chain_id) as view:
        assert_same_tree(ctr, view, "container vs export_diff registered on its parent",
                         mtimes=True)
        # hardlinks made in the container are still hardlinks
        assert os.lstat(view / "hl/a").st_ino == os.lstat(view / "hl/b").st_ino
        assert os.getxattr(view / "bin-cap", "security.capability") == _caps_setuid()
        assert stat.S_IMODE(os.lstat(view / "usr/bin/suid").st_mode) == 0o4755


def test_commit_matches_export(store, base):
    _container(store, "c", base.chain_id, ROUND_TRIP_OPS)
    committed = store.commit("c")
    assert committed.parent == base.chain_id
    with mounted(store, "c") as ctr, mounted(store, committed.chain_id) as view:
        assert_same_tree(ctr, view, "container vs its committed layer", mtimes=True)
        assert os.lstat(view / "hl/a").st_ino == os.lstat(view / "hl/b").st_ino


def test_commit_and_export_agree_on_diff_id(store, base):
    _container(store, "c", base.chain_id, [create_file("/etc/new", b"n"), remove_all("/opt")])
    diff_id, data = _export(store, "c")
    committed = store.commit("c")
    assert committed.diff_id == diff_id
    # registering the exported tar on the parent finds the committed layer
    again = register_bytes(store, data, parent=base.chain_id)
    assert again.chain_id == committed.chain_id
    assert len(store.layers()) == 2


def test_commit_of_container_without_parent(store):
    _container(store, "c", None, [create_dir("/etc"), create_file("/etc/a", b"a")])
    layer = store.commit("c")
    assert layer.parent is None
    assert layer.chain_id == layer.diff_id
    assert layer.size == 1
    with mounted(store, layer.chain_id) as mp:
        assert (mp / "etc/a").read_bytes() == b"a"


def test_exported_diff_applies_deletions_on_another_container(store, base):
    _container(store, "c", base.chain_id, [remove_all("/var/lib/old"), remove_all("/etc/hosts"),
                                           create_file("/etc/added", b"x")])
    _, data = _export(store, "c")
    layer = register_bytes(store, data, parent=base.chain_id)
    store.create_container("d", layer.chain_id)
    with mounted(store, "d") as mp:
        assert not (mp / "var/lib/old").exists()
        assert not (mp / "etc/hosts").exists()
        assert (mp / "etc/added").read_bytes() == b"x"
        assert (mp / "etc/passwd").exists() and (mp / "var/lib").is_dir()


def test_unusual_names_in_changes_and_round_trip(store, base):
    odd = ["with space", "new\nline", "\u00fcml\u00e4ut-\u65e5\u672c",
           b"latin1-\xe9".decode("utf-8", "surrogateescape"), ".wh-not-a-whiteout", "x" * 255]
    ops = [create_dir("/odd")] + [create_file(f"/odd/{n}", n.encode("utf-8", "surrogateescape"))
                                  for n in odd]
    ops.append(remove_all("/etc/hosts"))
    _container(store, "c", base.chain_id, ops)
    expected = sorted([("/odd", "A")] + [(f"/odd/{n}", "A") for n in odd]
                      + [("/etc", "C"), ("/etc/hosts", "D")])
    assert sorted(changes_of(store, "c")) == expected
    diff_id, data = _export(store, "c")
    layer = register_bytes(store, data, parent=base.chain_id)
    with mounted(store, "c") as ctr, mounted(store, layer.chain_id) as view:
        assert_same_tree(ctr, view, "round trip with unusual names")
