"""Graph-level behaviour not tied to one driver's format: chains, reuse, races."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

import layerfs
from tarbuild import simple_layer
from layerfs import digest, errors

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for overlay mounts")


def _diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


CHAIN = [
    simple_layer({"etc/a": b"1", "etc/b": b"2", "usr/bin/x": b"x" * 4096}),
    simple_layer({"etc/c": b"3"}, whiteouts=("etc/a",)),
    simple_layer({"opt/app": b"app"}, whiteouts=("usr/bin/x",)),
]


def _view(store, chain_id):
    root = store.mount(chain_id)
    try:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    finally:
        store.unmount(chain_id)


@pytest.mark.parametrize("parallel", [True, False])
def test_register_chain_matches_one_by_one(tmp_path, parallel):
    with layerfs.open_store(tmp_path / "a") as one, layerfs.open_store(tmp_path / "b") as many:
        parent = None
        for data in CHAIN:
            parent = one.register(io.BytesIO(data), parent=parent).chain_id
        layers = many.register_chain([(io.BytesIO(d), _diff_id(d)) for d in CHAIN], parallel=parallel)
        assert [l.chain_id for l in layers] == digest.chain_ids([_diff_id(d) for d in CHAIN])
        assert layers[-1].chain_id == parent
        assert [l.parent for l in layers] == [None, layers[0].chain_id, layers[1].chain_id]
        assert _view(one, parent) == _view(many, parent)
        assert "etc/a" not in _view(many, parent) and "usr/bin/x" not in _view(many, parent)


def test_known_layers_are_not_read_again(tmp_path):
    with layerfs.open_store(tmp_path / "root") as store:
        first = store.register_chain([(io.BytesIO(d), _diff_id(d)) for d in CHAIN])
        dirs = store.driver.ids()

        def never():
            raise AssertionError("a stored layer was read again")

        again = store.register_chain([(never, _diff_id(d)) for d in CHAIN])
        assert [l.chain_id for l in again] == [l.chain_id for l in first]
        assert [l.refs for l in again] == [2, 2, 2]
        assert store.driver.ids() == dirs


def test_a_bad_layer_in_a_chain_stores_nothing(tmp_path):
    with layerfs.open_store(tmp_path / "root") as store:
        base = store.register(io.BytesIO(CHAIN[0]))
        before = (store.layers(), store.driver.ids())
        bad = [(io.BytesIO(CHAIN[1]), _diff_id(CHAIN[1])), (io.BytesIO(CHAIN[2]), _diff_id(CHAIN[1]))]
        with pytest.raises(errors.DigestMismatch):
            store.register_chain(bad, parent=base.chain_id)
        assert (store.layers(), store.driver.ids()) == before
        assert store.check() == []


def test_whiteouts_that_hide_nothing_are_not_listed(tmp_path):
    # A base layer with a whiteout (nothing below it to hide) and a new
    # directory with one: overlayfs would list those names but fail to open them.
    with layerfs.open_store(tmp_path / "root") as store:
        base = store.register(io.BytesIO(simple_layer({"d/keep": b"k"}, whiteouts=("d/ghost", "ghost2"))))
        top = store.register(io.BytesIO(simple_layer({"new/f": b"f"}, whiteouts=("new/ghost", "d/keep"))), parent=base.chain_id)
        root = store.mount(top.chain_id)
        try:
            assert sorted(os.listdir(root)) == ["d", "new"]
            assert os.listdir(root / "d") == []
            assert os.listdir(root / "new") == ["f"]
        finally:
            store.unmount(top.chain_id)


def test_a_concurrent_registration_of_the_same_prefix_is_retried(tmp_path):
    root = tmp_path / "root"
    with layerfs.open_store(root) as store, layerfs.open_store(root) as other:
        calls = []

        def last_layer():
            # While this store applies the chain, another user of the root
            # stores its first two layers.
            if not calls:
                other.register_chain([(io.BytesIO(d), _diff_id(d)) for d in CHAIN[:2]])
            calls.append(1)
            return io.BytesIO(CHAIN[2])

        sources = [(io.BytesIO(CHAIN[0]), _diff_id(CHAIN[0])), (io.BytesIO(CHAIN[1]), _diff_id(CHAIN[1])), (last_layer, _diff_id(CHAIN[2]))]
        layers = store.register_chain(sources, parallel=False)
        assert len(calls) == 2  # the first attempt was dropped, the second reused the prefix
        assert [l.refs for l in layers] == [2, 2, 1]
        assert "opt/app" in _view(store, layers[-1].chain_id)
        assert store.check() == []
        known = {l.cache_id for l in store.layers()}
        assert store.driver.ids() == known


def test_reaping_spares_a_fresh_unlocked_intent_of_a_live_process(tmp_path):
    # A live owner creates its temporary intent file, then locks it: in
    # between, another process opening the store must not take it for a leftover.
    from layerfs._intents import TMP_GRACE_SECONDS, Intents

    intents = Intents(tmp_path / "intents")
    fresh = intents.dir / ".tmp-abc-1234"
    fresh.touch()
    assert intents.reap(lambda key: None) == [] and fresh.exists()
    old = os.stat(fresh).st_mtime - TMP_GRACE_SECONDS - 1
    os.utime(fresh, (old, old))
    intents.reap(lambda key: None)
    assert not fresh.exists()
