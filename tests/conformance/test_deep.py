"""Deep images: a 400-layer chain (past the 128-layer mount-option limit,
within the kernel's 500 lower layers) mounts and reads correctly, both as a
read-only view and under a container."""

from __future__ import annotations

import os

import pytest

from conformance import mounted, register_chain
from conftest import mounts_under
from tarbuild import LayerTar

DEPTH = 400


def _deep_chain():
    """(tars, expected {path: content}, expected dirs) for a DEPTH-layer image."""
    tars = []
    files: dict[str, bytes] = {}
    for i in range(DEPTH):
        t = LayerTar().dir("layers")
        t.file(f"layers/layer-{i}", f"{i}\n".encode())
        files[f"layers/layer-{i}"] = f"{i}\n".encode()
        t.file("top", f"top from {i}\n".encode())
        files["top"] = f"top from {i}\n".encode()
        if i % 10 == 9:
            gone = f"layers/layer-{i - 5}"
            t.whiteout(gone)
            del files[gone]
        if i % 50 == 0:
            # opaque: everything lower layers put in opq/ disappears
            t.dir("opq").opaque("opq").file(f"opq/from-{i}", b"o")
            for k in [k for k in files if k.startswith("opq/")]:
                del files[k]
            files[f"opq/from-{i}"] = b"o"
        else:
            t.dir("opq").file(f"opq/extra-{i}", b"e")
            files[f"opq/extra-{i}"] = b"e"
        tars.append(t.bytes())
    return tars, files


def _read_tree(root):
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _skip_snapshot_driver(driver_name):
    if driver_name == "devicemapper":
        pytest.skip("devicemapper: these chains test overlay's mount-option and lower-layer limits; a thin "
                    "snapshot is one flat device whatever its depth, so there is no limit to test, and 400 "
                    "snapshots take ~15 min in the TCG VM (deep snapshot chains: test_128_layers_mount, "
                    "test_changes_deep_chain, test_transitivity)")


@pytest.mark.slow
def test_400_layer_chain(store, store_root, driver_name):
    _skip_snapshot_driver(driver_name)
    tars, expected = _deep_chain()
    layers = register_chain(store, tars)
    top = layers[-1]
    assert len(store.layers()) == DEPTH
    assert top.parent == layers[-2].chain_id

    with mounted(store, top.chain_id) as view:
        got = _read_tree(view)
        assert got == expected
        # the bottom layer is really reachable
        assert (view / "layers/layer-0").read_bytes() == b"0\n"

    store.create_container("deep", top.chain_id)
    with mounted(store, "deep") as mp:
        assert _read_tree(mp) == expected
        (mp / "layers/layer-0").write_bytes(b"changed at the top\n")
        os.unlink(mp / "layers/layer-1")
        (mp / "new").write_bytes(b"n")
    with mounted(store, "deep") as mp:
        assert (mp / "layers/layer-0").read_bytes() == b"changed at the top\n"
        assert not (mp / "layers/layer-1").exists()
        assert (mp / "new").read_bytes() == b"n"
    assert [(c.path, c.kind) for c in store.changes("deep")] == [
        ("/layers", "C"), ("/layers/layer-0", "C"), ("/layers/layer-1", "D"), ("/new", "A")]
    assert mounts_under(store_root) == []


@pytest.mark.slow
def test_deep_view_of_middle_layer(store, driver_name):
    _skip_snapshot_driver(driver_name)
    tars, _ = _deep_chain()
    layers = register_chain(store, tars[:200])
    mid = layers[130]
    with mounted(store, mid.chain_id) as view:
        assert (view / "top").read_bytes() == b"top from 130\n"
        assert not (view / "layers/layer-131").exists()
        assert (view / "layers/layer-0").read_bytes() == b"0\n"
        assert sorted(os.listdir(view / "opq"))[0] == "extra-101"
