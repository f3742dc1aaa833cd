"""Hostile and malformed layer tars are refused with InvalidLayer, and leave the
store (its layers, its root directory, its mounts) exactly as it was, and
nothing written outside the layer."""

from __future__ import annotations

import os

import pytest

from layerfs import errors

from conformance import chain_ids_of, files_containing, listing, register_bytes
from tarbuild import LayerTar, gzip_bytes, zstd_bytes

from conftest import mounts_under

PAYLOAD = b"hostile-payload-" + os.urandom(8).hex().encode()


def _outside(work_dir):
    """A directory outside the store that hostile entries try to reach."""
    d = work_dir / "outside"
    d.mkdir(exist_ok=True)
    (d / "victim").write_bytes(b"victim content")
    return d


def _cases(outside):
    """name -> tar bytes; each must be refused."""
    o = str(outside)
    rel_up = "../" * 30 + o.lstrip("/")    # relative path that climbs to `outside`
    c = {}
    c["dotdot-file"] = LayerTar().file("../escape", PAYLOAD).bytes()
    c["dotdot-deep-file"] = LayerTar().dir("a").file("a/../../escape", PAYLOAD).bytes()
    c["dotdot-to-outside"] = LayerTar().file(rel_up + "/pwned", PAYLOAD).bytes()
    c["dotdot-dir"] = LayerTar().dir("../escape-dir").bytes()
    c["dotdot-symlink-entry"] = LayerTar().symlink("../escape-link", "/etc").bytes()
    c["absolute-file"] = LayerTar().file(o + "/pwned", PAYLOAD).bytes()
    c["absolute-dir"] = LayerTar().dir(o + "/pwned-dir").bytes()
    c["symlink-abs-then-file"] = (LayerTar()
                                  .symlink("link", o)
                                  .file("link/pwned", PAYLOAD).bytes())
    c["symlink-rel-then-file"] = (LayerTar()
                                  .symlink("link", rel_up)
                                  .file("link/pwned", PAYLOAD).bytes())
    c["symlink-then-dir"] = (LayerTar()
                             .symlink("link", o)
                             .dir("link/pwned-dir").bytes())
    c["symlink-then-deep-file"] = (LayerTar()
                                   .dir("d")
                                   .symlink("d/link", "../" * 10)
                                   .file("d/link" + o + "/pwned", PAYLOAD).bytes())
    c["symlink-then-hardlink-through"] = (LayerTar()
                                          .symlink("link", o)
                                          .hardlink("stolen", "link/victim").bytes())
    c["symlink-then-symlink-through"] = (LayerTar()
                                         .symlink("link", o)
                                         .symlink("link/pwned", "/etc/passwd").bytes())
    c["symlink-dir-replaced-then-file"] = (LayerTar()
                                           .dir("etc")
                                           .symlink("etc", o)
                                           .file("etc/pwned", PAYLOAD).bytes())
    c["hardlink-absolute-outside"] = LayerTar().hardlink("stolen", o + "/victim").bytes()
    c["hardlink-dotdot-outside"] = LayerTar().hardlink("stolen", rel_up + "/victim").bytes()
    c["hardlink-missing-target"] = (LayerTar()
                                    .file("present", b"p")
                                    .hardlink("stolen", "not-there").bytes())
    c["hardlink-before-target"] = (LayerTar()
                                   .hardlink("early", "later")
                                   .file("later", PAYLOAD).bytes())
    c["whiteout-dotdot"] = LayerTar().file("ok", PAYLOAD).file(".wh...", b"").bytes()
    c["whiteout-dotdot-in-dir"] = (LayerTar()
                                   .dir("a").file("a/ok", PAYLOAD)
                                   .file("a/.wh...", b"").bytes())
    return c


def _malformed():
    good = LayerTar().file("f", PAYLOAD).file("g", PAYLOAD * 100).bytes()
    c = {}
    c["garbage"] = b"this is not a tar archive at all " * 40
    c["truncated-in-header"] = good[:1024 + 200]   # inside the second header
    c["truncated-in-content"] = good[:1024 + 512 + 100]  # inside the second file
    c["bad-header-checksum"] = bytearray(good)
    c["bad-header-checksum"][148:156] = b"0000000\x00"
    c["bad-header-checksum"] = bytes(c["bad-header-checksum"])
    c["truncated-gzip"] = gzip_bytes(good)[:-30]
    c["truncated-zstd"] = zstd_bytes(good)[:-10]
    c["gzip-of-garbage"] = gzip_bytes(b"\x01\x02garbage" * 100)
    return c


HOSTILE = sorted(_cases("/nonexistent").keys())
MALFORMED = sorted(_malformed().keys())


def _assert_refused(store, store_root, work_dir, data, parent):
    outside = _outside(work_dir)
    before_layers = chain_ids_of(store.layers())
    before_files = listing(store_root)
    before_outside = listing(outside)
    with pytest.raises(errors.InvalidLayer):
        register_bytes(store, data, parent=parent)
    assert chain_ids_of(store.layers()) == before_layers, "a refused layer was stored"
    assert listing(store_root) == before_files, "a refused layer left files in the store root"
    assert files_containing(store_root, PAYLOAD) == []
    assert listing(outside) == before_outside, "a hostile entry wrote outside the layer"
    assert (outside / "victim").read_bytes() == b"victim content"
    assert not os.path.lexists(work_dir.parent / "escape")
    assert mounts_under(store_root) == []
    assert store.check() == []


@pytest.fixture
def base_layer(store):
    # a successful register first, so lazily created store files already exist
    return register_bytes(store, LayerTar().dir("etc").file("etc/passwd", b"root\n").bytes())


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("on_parent", [False, True], ids=["base", "child"])
def test_hostile_tar_is_refused(store, store_root, work_dir, base_layer, case, on_parent):
    data = _cases(_outside(work_dir))[case]
    _assert_refused(store, store_root, work_dir, data,
                    base_layer.chain_id if on_parent else None)


@pytest.mark.parametrize("case", ["symlink-abs-then-file", "dotdot-file", "hardlink-missing-target"])
@pytest.mark.parametrize("compress", [gzip_bytes, zstd_bytes], ids=["gzip", "zstd"])
def test_hostile_compressed_tar_is_refused(store, store_root, work_dir, base_layer, case,
                                           compress):
    data = compress(_cases(_outside(work_dir))[case])
    _assert_refused(store, store_root, work_dir, data, base_layer.chain_id)


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_tar_is_refused(store, store_root, work_dir, base_layer, case):
    _assert_refused(store, store_root, work_dir, _malformed()[case], base_layer.chain_id)


def test_invalid_layer_error_names_the_entry(store, base_layer):
    data = LayerTar().file("fine", b"ok").file("../escape-named", PAYLOAD).bytes()
    with pytest.raises(errors.InvalidLayer) as ei:
        register_bytes(store, data)
    assert "escape-named" in str(ei.value)


def test_symlink_inside_layer_is_fine_when_not_written_through(store, work_dir):
    # the benign counterparts of the hostile cases must still work
    o = str(_outside(work_dir))
    data = (LayerTar()
            .symlink("abs-link", o)
            .symlink("rel-link", "../../..")
            .dir("real")
            .file("real/f", b"f")
            .hardlink("real/g", "real/f")
            .file("dots..name", b"x")
            .file("..leading", b"y")
            .file("a..b/..c", b"z")
            .bytes())
    layer = register_bytes(store, data)
    assert layer.chain_id in chain_ids_of(store.layers())
    assert listing(_outside(work_dir)) == {"victim"}


@pytest.mark.parametrize("xattr,value,path", [
    ("trusted.overlay.opaque", b"y", "d"),
    ("trusted.overlay.redirect", b"/etc", "d"),
    ("trusted.overlay.metacopy", b"", "d"),
    ("user.overlay.opaque", b"y", "d"),
], ids=["opaque", "redirect", "metacopy", "user-opaque"])
def test_overlay_private_xattrs_in_tar_have_no_effect(store, xattr, value, path):
    """A layer's meaning comes from its OCI entries only: overlayfs' own xattrs in a tar
    are either refused or have no effect on the mounted view."""
    base = register_bytes(store, (LayerTar().dir("d").file("d/lower", b"l")
                                  .dir("etc").file("etc/passwd", b"root").bytes()))
    data = LayerTar().dir(path, xattrs={xattr: value}).file(f"{path}/new", b"n").bytes()
    try:
        layer = register_bytes(store, data, parent=base.chain_id)
    except errors.InvalidLayer:
        assert chain_ids_of(store.layers()) == {base.chain_id}
        return
    from conformance import mounted
    with mounted(store, layer.chain_id) as mp:
        assert sorted(os.listdir(mp / path)) == ["lower", "new"]
        assert (mp / "d/lower").read_bytes() == b"l"
