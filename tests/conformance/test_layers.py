"""Registering layers: digests, chain ids, compression, dedup, refcounts, gc."""

from __future__ import annotations

import io
import os

import pytest

from layerfs import errors

from conformance import (chain_ids_of, container_names, copies_of, files_containing, listing, mounted,
                         register_bytes, register_chain)
from tarbuild import LayerTar, chain_id, gzip_bytes, sha256_digest, zstd_bytes, zstd_stream_bytes


def _base() -> LayerTar:
    return (LayerTar()
            .dir("etc")
            .file("etc/hostname", b"layerfs\n")
            .dir("bin")
            .file("bin/sh", b"#!fake shell\n" * 10, mode=0o755)
            .symlink("bin/bash", "sh"))


def _child() -> LayerTar:
    return (LayerTar()
            .dir("etc")
            .file("etc/hostname", b"child\n")
            .file("etc/motd", b"hello\n"))


# ---------------------------------------------------------------------------
# digests


def test_diff_id_is_sha256_of_uncompressed_tar(store):
    data = _base().bytes()
    layer = register_bytes(store, data)
    assert layer.diff_id == sha256_digest(data)
    assert layer.diff_id.startswith("sha256:") and len(layer.diff_id) == 7 + 64


def test_base_chain_id_is_diff_id_and_parent_none(store):
    layer = register_bytes(store, _base().bytes())
    assert layer.chain_id == layer.diff_id
    assert layer.parent is None


def test_chain_ids_follow_oci_image_spec(store):
    tars = [_base().bytes(), _child().bytes(),
            LayerTar().file("third", b"3").bytes()]
    layers = register_chain(store, tars)
    parent = None
    for data, layer in zip(tars, layers):
        diff_id = sha256_digest(data)
        assert layer.diff_id == diff_id
        assert layer.parent == parent
        # sha256 of exactly "<parent chain id> <diff id>", both with prefix
        expected = diff_id if parent is None else sha256_digest(f"{parent} {diff_id}".encode())
        assert layer.chain_id == expected == chain_id(parent, diff_id)
        parent = layer.chain_id


def test_layer_lookup_and_listing(store):
    base, child = register_chain(store, [_base().bytes(), _child().bytes()])
    got = store.layer(child.chain_id)
    assert (got.chain_id, got.diff_id, got.parent, got.size) == \
        (child.chain_id, child.diff_id, child.parent, child.size)
    assert chain_ids_of(store.layers()) == {base.chain_id, child.chain_id}
    assert all(isinstance(layer.chain_id, str) for layer in store.layers())


def test_unknown_layer_is_not_found(store):
    missing = "sha256:" + "0" * 64
    with pytest.raises(errors.NotFound):
        store.layer(missing)
    with pytest.raises(errors.NotFound):
        store.release(missing)
    with pytest.raises(errors.NotFound):
        register_bytes(store, _child().bytes(), parent=missing)
    assert store.layers() == []


def test_errors_are_layerfs_errors():
    for name in ("NotFound", "AlreadyExists", "InUse", "InvalidLayer", "DigestMismatch",
                 "DriverUnavailable", "InvalidOption"):
        assert issubclass(getattr(errors, name), errors.LayerfsError), name


def test_size_counts_regular_file_content(store):
    data = (LayerTar()
            .dir("d")
            .file("d/ten", b"x" * 10)
            .file("d/hundred", b"y" * 100)
            .file("empty", b"")
            .symlink("d/link", "ten")
            .fifo("fifo")
            .bytes())
    layer = register_bytes(store, data)
    assert layer.size == 110
    assert store.layer(layer.chain_id).size == 110


# ---------------------------------------------------------------------------
# compression and sources


@pytest.mark.parametrize("compress", [gzip_bytes, zstd_bytes, zstd_stream_bytes],
                         ids=["gzip", "zstd", "zstd-stream"])
def test_compressed_layer_has_uncompressed_diff_id(store, compress):
    data = _base().bytes()
    layer = register_bytes(store, compress(data))
    assert layer.diff_id == sha256_digest(data)
    assert layer.chain_id == sha256_digest(data)
    with mounted(store, layer.chain_id) as mp:
        assert (mp / "etc/hostname").read_bytes() == b"layerfs\n"


@pytest.mark.parametrize("compress", [gzip_bytes, zstd_bytes], ids=["gzip", "zstd"])
def test_compressed_and_plain_register_to_the_same_layer(store, compress):
    base = register_bytes(store, _base().bytes())
    data = _child().bytes()
    plain = register_bytes(store, data, parent=base.chain_id)
    packed = register_bytes(store, compress(data), parent=base.chain_id)
    assert packed.chain_id == plain.chain_id
    assert len(store.layers()) == 2


@pytest.mark.parametrize("kind", ["str", "Path"])
def test_register_from_path(store, work_dir, kind):
    data = _base().bytes()
    p = work_dir / "layer.tar.gz"
    p.write_bytes(gzip_bytes(data))
    layer = store.register(str(p) if kind == "str" else p)
    assert layer.diff_id == sha256_digest(data)


class _NonSeekable(io.RawIOBase):
    """A pipe-like binary stream: read() only, no seek/tell."""

    def __init__(self, data: bytes, chunk: int = 4096):
        self._buf = io.BytesIO(data)
        self._chunk = chunk

    def readable(self):
        return True

    def seekable(self):
        return False

    def readinto(self, b):
        piece = self._buf.read(min(len(b), self._chunk))
        b[:len(piece)] = piece
        return len(piece)


@pytest.mark.parametrize("compress", [None, gzip_bytes, zstd_bytes], ids=["plain", "gzip", "zstd"])
def test_register_from_non_seekable_stream(store, compress):
    data = _base().bytes()
    src = _NonSeekable(compress(data) if compress else data)
    layer = store.register(src)
    assert layer.diff_id == sha256_digest(data)


def test_register_from_pipe(store):
    data = LayerTar().file("big", os.urandom(1 << 20)).bytes()
    r, w = os.pipe()
    import threading

    def writer():
        with os.fdopen(w, "wb") as f:
            f.write(gzip_bytes(data))
    t = threading.Thread(target=writer)
    t.start()
    with os.fdopen(r, "rb") as f:
        layer = store.register(f)
    t.join()
    assert layer.diff_id == sha256_digest(data)


def test_empty_layer(store):
    data = LayerTar().bytes()
    layer = register_bytes(store, data)
    assert layer.diff_id == sha256_digest(data)
    assert layer.size == 0
    with mounted(store, layer.chain_id) as mp:
        assert [n for n in os.listdir(mp) if n != "lost+found"] == []


# ---------------------------------------------------------------------------
# expected_diff_id


def test_expected_diff_id_match(store):
    data = _base().bytes()
    layer = register_bytes(store, gzip_bytes(data), expected_diff_id=sha256_digest(data))
    assert layer.diff_id == sha256_digest(data)


def test_expected_diff_id_mismatch_stores_nothing(store, store_root):
    base = register_bytes(store, _base().bytes())
    before_layers = chain_ids_of(store.layers())
    before_files = listing(store_root)
    marker = b"digest-mismatch-marker-%d" % os.getpid()
    data = LayerTar().file("payload", marker * 100).bytes()
    wrong = sha256_digest(b"something else")
    with pytest.raises(errors.DigestMismatch):
        register_bytes(store, data, parent=base.chain_id, expected_diff_id=wrong)
    assert chain_ids_of(store.layers()) == before_layers
    assert listing(store_root) == before_files
    assert files_containing(store_root, marker) == []
    assert store.check() == []
    # and the correct digest still works afterwards
    layer = register_bytes(store, data, parent=base.chain_id, expected_diff_id=sha256_digest(data))
    assert layer.parent == base.chain_id


# ---------------------------------------------------------------------------
# dedup and reference counting


def test_same_content_same_parent_is_one_layer(store, store_root):
    marker = b"dedup-marker-" + os.urandom(8).hex().encode()
    content = marker + os.urandom(1 << 20)
    data = LayerTar().file("blob", content).bytes()
    a = register_bytes(store, data)
    b = register_bytes(store, gzip_bytes(data))
    assert a.chain_id == b.chain_id
    assert [layer.chain_id for layer in store.layers()] == [a.chain_id]
    # no second copy on disk
    assert copies_of(store_root, marker) == 1


def test_same_content_on_other_parent_is_another_layer(store):
    p1 = register_bytes(store, _base().bytes())
    p2 = register_bytes(store, LayerTar().file("other-base", b"2").bytes())
    data = _child().bytes()
    c1 = register_bytes(store, data, parent=p1.chain_id)
    c2 = register_bytes(store, data, parent=p2.chain_id)
    assert c1.diff_id == c2.diff_id
    assert c1.chain_id != c2.chain_id
    assert len(store.layers()) == 4
    with mounted(store, c1.chain_id) as m1:
        assert (m1 / "bin/sh").exists() and not (m1 / "other-base").exists()
    with mounted(store, c2.chain_id) as m2:
        assert (m2 / "other-base").exists() and not (m2 / "bin/sh").exists()


def test_release_drops_one_reference(store):
    data = _base().bytes()
    layer = register_bytes(store, data)
    register_bytes(store, data)          # second reference
    store.release(layer.chain_id)
    assert store.layer(layer.chain_id).chain_id == layer.chain_id
    store.release(layer.chain_id)
    with pytest.raises(errors.NotFound):
        store.layer(layer.chain_id)
    assert store.layers() == []
    with pytest.raises(errors.NotFound):
        store.release(layer.chain_id)


def test_released_layer_files_are_reclaimed(store, store_root):
    marker = b"reclaim-marker-" + os.urandom(8).hex().encode()
    layer = register_bytes(store, LayerTar().file("f", marker).bytes())
    assert files_containing(store_root, marker)
    store.release(layer.chain_id)
    store.gc()
    assert files_containing(store_root, marker) == []
    assert store.check() == []


def test_release_layer_with_child_layer_is_in_use(store):
    base, child = register_chain(store, [_base().bytes(), _child().bytes()])
    with pytest.raises(errors.InUse):
        store.release(base.chain_id)
    # the failed release changed nothing
    assert chain_ids_of(store.layers()) == {base.chain_id, child.chain_id}
    with mounted(store, child.chain_id) as mp:
        assert (mp / "bin/sh").exists()
    store.release(child.chain_id)
    with pytest.raises(errors.NotFound):
        store.layer(child.chain_id)
    store.release(base.chain_id)
    assert store.layers() == []


def test_release_layer_with_container_is_in_use(store):
    base = register_bytes(store, _base().bytes())
    store.create_container("c", base.chain_id)
    with pytest.raises(errors.InUse):
        store.release(base.chain_id)
    assert store.layer(base.chain_id).chain_id == base.chain_id
    store.remove_container("c")
    store.release(base.chain_id)
    with pytest.raises(errors.NotFound):
        store.layer(base.chain_id)


def test_release_with_spare_reference_while_children_exist(store):
    data = _base().bytes()
    base = register_bytes(store, data)
    register_bytes(store, data)  # two references
    child = register_bytes(store, _child().bytes(), parent=base.chain_id)
    store.release(base.chain_id)  # not the last reference: fine
    assert store.layer(base.chain_id)
    with pytest.raises(errors.InUse):
        store.release(base.chain_id)
    store.release(child.chain_id)
    store.release(base.chain_id)
    assert store.layers() == []


def test_gc_keeps_referenced_layers(store):
    base, child = register_chain(store, [_base().bytes(), _child().bytes()])
    store.create_container("c", child.chain_id)
    store.gc()
    assert chain_ids_of(store.layers()) == {base.chain_id, child.chain_id}
    assert container_names(store) == {"c"}
    with mounted(store, "c") as mp:
        assert (mp / "etc/motd").read_bytes() == b"hello\n"
    assert store.check() == []


def test_layers_survive_reopen(store, store_root, driver_name):
    import layerfs
    base, child = register_chain(store, [_base().bytes(), _child().bytes()])
    store.close()
    with layerfs.open_store(store_root, driver=driver_name) as s2:
        got = {layer.chain_id: layer for layer in s2.layers()}
        assert set(got) == {base.chain_id, child.chain_id}
        assert got[child.chain_id].parent == base.chain_id
        assert got[child.chain_id].diff_id == child.diff_id
        with mounted(s2, child.chain_id) as mp:
            assert (mp / "etc/hostname").read_bytes() == b"child\n"
        assert s2.check() == []


def test_release_mounted_layer_is_in_use(store):
    layer = register_bytes(store, _base().bytes())
    path = store.mount(layer.chain_id)
    try:
        with pytest.raises(errors.InUse):
            store.release(layer.chain_id)
        assert (path / "etc/hostname").read_bytes() == b"layerfs\n"
    finally:
        store.unmount(layer.chain_id)
    store.release(layer.chain_id)
    with pytest.raises(errors.NotFound):
        store.layer(layer.chain_id)
