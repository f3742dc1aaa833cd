"""Unit and property tests for the whiteout codec (layerfs/whiteout.py)."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from layerfs import whiteout
from layerfs.whiteout import (
    AUFS_META_PREFIX,
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    BadWhiteout,
    Kind,
    classify_name,
    is_overlay_opaque,
    is_overlay_whiteout,
    is_private_xattr,
    is_reserved_name,
    whiteout_name,
)

# Any single path component a filesystem accepts: no '/', no NUL, not '.' or '..'.
file_names = (
    st.text(
        alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=40,
    )
    .filter(lambda n: n not in (".", ".."))
)
# Names that start with the whiteout prefix (reserved: a union never shows them).
reserved_names = file_names.map(lambda n: WHITEOUT_PREFIX + n) | st.sampled_from(
    [".wh.", ".wh..", ".wh...", ".wh..opq", ".wh..wh.plnk", ".wh..wh..opq"]
)


# -- classify_name: examples ---------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "passwd", ".bashrc", "..hidden", "...", ".w", ".wh", "wh.x", "x.wh.y", "-", " ", "é", ".wh-x", ".WH.x"],
)
def test_normal_names(name):
    assert classify_name(name) == (Kind.NORMAL, None)


@pytest.mark.parametrize(
    "name, target",
    [
        (".wh.x", "x"),
        (".wh.passwd", "passwd"),
        (".wh..bashrc", ".bashrc"),
        (".wh....", "..."),
        (".wh. ", " "),
        (".wh..wh", ".wh"),  # not the aufs meta prefix: ".wh..wh" lacks the trailing dot
        (".wh.é", "é"),
    ],
)
def test_whiteout_names(name, target):
    assert classify_name(name) == (Kind.WHITEOUT, target)


def test_opaque_marker():
    assert OPAQUE_MARKER == ".wh..wh..opq"
    assert classify_name(".wh..wh..opq") == (Kind.OPAQUE, None)


@pytest.mark.parametrize("name", [".wh..wh.plnk", ".wh..wh.aufs", ".wh..wh.orph", ".wh..wh.", ".wh..wh..opqx"])
def test_aufs_meta_names(name):
    assert classify_name(name) == (Kind.AUFS_META, None)


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", ".wh.a\0b"])
def test_bad_whiteouts_raise(name):
    with pytest.raises(BadWhiteout):
        classify_name(name)


def test_bad_whiteout_is_a_value_error_naming_the_entry():
    with pytest.raises(ValueError) as info:
        classify_name(".wh..")
    assert ".wh.." in str(info.value)


# -- whiteout_name --------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [("x", ".wh.x"), (".bashrc", ".wh..bashrc"), ("...", ".wh...."), ("é", ".wh.é")])
def test_whiteout_name_examples(name, expected):
    assert whiteout_name(name) == expected


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/", "a/"])
def test_whiteout_name_rejects_invalid_names(name):
    with pytest.raises(BadWhiteout):
        whiteout_name(name)


def test_whiteout_name_rejects_nul_like_classify_name():
    with pytest.raises(BadWhiteout):
        whiteout_name("a\0b")


# -- properties -------------------------------------------------------------------


@settings(max_examples=300)
@given(file_names)
@example("x")
@example(".x")
@example("..x")
@example(".wh")
@example("wh.")
def test_round_trip_for_unreserved_names(name):
    if name.startswith(WHITEOUT_PREFIX):
        return  # covered by test_reserved_names_do_not_round_trip
    assert not is_reserved_name(name)
    assert classify_name(name) == (Kind.NORMAL, None)
    wh = whiteout_name(name)
    assert wh.startswith(WHITEOUT_PREFIX)
    assert is_reserved_name(wh)
    assert classify_name(wh) == (Kind.WHITEOUT, name)


@settings(max_examples=200)
@given(reserved_names)
@example(".wh.")
@example(".wh..opq")
@example(".wh.x")
def test_reserved_names_do_not_round_trip(name):
    """A name that itself starts with ``.wh.`` is reserved: no union ever holds it,
    so it never needs a whiteout.  Its would-be whiteout ``.wh..wh.<rest>`` falls
    in the aufs bookkeeping namespace (or is the opaque marker itself): it is
    never read back as a whiteout of *name*."""
    assert is_reserved_name(name)
    wh = whiteout_name(name)
    assert wh.startswith(AUFS_META_PREFIX)
    kind, target = classify_name(wh)
    if name == ".wh..opq":
        assert (kind, target) == (Kind.OPAQUE, None)
    else:
        assert (kind, target) == (Kind.AUFS_META, None)


@settings(max_examples=300)
@given(st.text(alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), max_size=30))
def test_classify_name_contract(name):
    """classify_name either classifies a name or raises BadWhiteout; a whiteout
    target is always a valid, non-empty component."""
    try:
        kind, target = classify_name(name)
    except BadWhiteout:
        assert name.startswith(WHITEOUT_PREFIX)
        assert name[len(WHITEOUT_PREFIX):] in ("", ".", "..")
        return
    if kind is Kind.WHITEOUT:
        assert name == WHITEOUT_PREFIX + target
        assert target not in ("", ".", "..") and "/" not in target
    else:
        assert target is None
    if not name.startswith(WHITEOUT_PREFIX):
        assert kind is Kind.NORMAL
    assert (kind is Kind.NORMAL) == (not is_reserved_name(name))


# -- overlay forms -----------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, rdev, expected",
    [
        (stat.S_IFCHR | 0o000, 0, True),
        (stat.S_IFCHR | 0o644, 0, True),  # the mode bits do not matter, only type and device
        (stat.S_IFCHR | 0o666, os.makedev(1, 3), False),  # /dev/null
        (stat.S_IFCHR, os.makedev(0, 1), False),
        (stat.S_IFCHR, os.makedev(1, 0), False),
        (stat.S_IFBLK, 0, False),  # a block device 0:0 is not a whiteout
        (stat.S_IFREG | 0o644, 0, False),
        (stat.S_IFDIR | 0o755, 0, False),
        (stat.S_IFLNK | 0o777, 0, False),
        (stat.S_IFIFO | 0o644, 0, False),
    ],
)
def test_is_overlay_whiteout(mode, rdev, expected):
    assert is_overlay_whiteout(mode, rdev) is expected


def test_is_overlay_whiteout_on_a_real_device(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mknod of character devices needs root")
    wh = tmp_path / "wh"
    null = tmp_path / "null"
    os.mknod(wh, stat.S_IFCHR | 0o000, 0)
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st_wh, st_null = os.lstat(wh), os.lstat(null)
    assert is_overlay_whiteout(st_wh.st_mode, st_wh.st_rdev)
    assert not is_overlay_whiteout(st_null.st_mode, st_null.st_rdev)
    reg = tmp_path / "reg"
    reg.write_bytes(b"")
    st_reg = os.lstat(reg)
    assert not is_overlay_whiteout(st_reg.st_mode, st_reg.st_rdev)


@pytest.mark.parametrize(
    "value, expected",
    [(b"y", True), (None, False), (b"", False), (b"n", False), (b"x", False), (b"yes", False), (b"Y", False)],
)
def test_is_overlay_opaque(value, expected):
    assert is_overlay_opaque(value) is expected


def test_overlay_constants():
    assert whiteout.OVERLAY_OPAQUE_XATTR == "trusted.overlay.opaque"
    assert whiteout.OVERLAY_OPAQUE_VALUE == b"y"
    assert is_overlay_opaque(whiteout.OVERLAY_OPAQUE_VALUE)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("trusted.overlay.opaque", True),
        ("trusted.overlay.redirect", True),
        ("trusted.overlay.metacopy", True),
        ("trusted.overlay.origin", True),
        ("trusted.overlay", False),
        ("trusted.overlayx", False),
        ("trusted.other", False),
        ("user.overlay.opaque_not_really", False),
        ("user.foo", False),
        ("security.capability", False),
        ("security.selinux", False),
        ("system.posix_acl_access", False),
    ],
)
def test_is_private_xattr(name, expected):
    assert is_private_xattr(name) is expected


@given(st.text(max_size=30))
def test_private_xattrs_are_exactly_the_overlay_namespace(suffix):
    assert is_private_xattr("trusted.overlay." + suffix)
    assert not is_private_xattr("user." + suffix)
    assert not is_private_xattr("security." + suffix)
