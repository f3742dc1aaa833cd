"""Unit and property tests for layerfs/digest.py (OCI diff ids and chain ids)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfs.digest import chain_id, chain_ids, is_digest, sha256_digest, short

EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
# Docker's well-known empty layer: an uncompressed tar of 1024 zero bytes.
EMPTY_LAYER_1024 = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"

digests = st.binary(max_size=64).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest())


def by_hand(parent: str, diff: str) -> str:
    return "sha256:" + hashlib.sha256((parent + " " + diff).encode("ascii")).hexdigest()


def test_sha256_digest_known_answers():
    assert sha256_digest(b"") == EMPTY_SHA256
    assert sha256_digest(bytes(1024)) == EMPTY_LAYER_1024
    assert sha256_digest(b"abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_chain_id_of_a_base_layer_is_its_diff_id():
    d = sha256_digest(b"layer 0")
    assert chain_id(None, d) == d


def test_chain_id_worked_example():
    # Three layers: L0, L1, L2 with diff ids D0, D1, D2 (OCI image spec, "ChainID").
    d0 = sha256_digest(b"base layer")
    d1 = sha256_digest(b"second layer")
    d2 = sha256_digest(b"third layer")
    c0 = d0
    c1 = "sha256:" + hashlib.sha256(f"{c0} {d1}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d2}".encode()).hexdigest()
    assert chain_id(None, d0) == c0
    assert chain_id(c0, d1) == c1
    assert chain_id(c1, d2) == c2
    assert chain_ids([d0, d1, d2]) == [c0, c1, c2]
    # The separator is exactly one space and the full "sha256:" strings are hashed.
    assert c1 != "sha256:" + hashlib.sha256(f"{c0}{d1}".encode()).hexdigest()
    assert c1 != "sha256:" + hashlib.sha256(f"{c0[7:]} {d1[7:]}".encode()).hexdigest()


def test_chain_id_with_literal_values():
    parent = EMPTY_LAYER_1024
    diff = EMPTY_SHA256
    expected = "sha256:" + hashlib.sha256(
        b"sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef "
        b"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    ).hexdigest()
    assert chain_id(parent, diff) == expected
    assert is_digest(expected)


def test_chain_id_depends_on_order():
    a, b = sha256_digest(b"a"), sha256_digest(b"b")
    assert chain_ids([a, b])[-1] != chain_ids([b, a])[-1]


def test_same_diff_twice_gives_distinct_chain_ids():
    d = sha256_digest(b"same")
    c = chain_ids([d, d, d])
    assert len(set(c)) == 3
    assert c[0] == d


def test_chain_ids_empty():
    assert chain_ids([]) == []


@settings(max_examples=50)
@given(st.lists(digests, max_size=8))
def test_chain_ids_property(diffs):
    chains = chain_ids(diffs)
    assert len(chains) == len(diffs)
    parent = None
    for d, c in zip(diffs, chains):
        expected = d if parent is None else by_hand(parent, d)
        assert c == expected
        assert is_digest(c)
        parent = c
    # every prefix's chain ids are a prefix of the whole list's
    for i in range(len(diffs) + 1):
        assert chain_ids(diffs[:i]) == chains[:i]


@pytest.mark.parametrize(
    "value",
    [EMPTY_SHA256, EMPTY_LAYER_1024, "sha256:" + "0" * 64, "sha256:" + "f" * 64],
)
def test_is_digest_accepts(value):
    assert is_digest(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sha256:",
        "sha256:" + "0" * 63,
        "sha256:" + "0" * 65,
        "sha256:" + "A" * 64,  # upper-case hex is not canonical
        "sha256:" + "g" * 64,
        "SHA256:" + "0" * 64,
        "sha512:" + "0" * 128,
        "0" * 64,  # no algorithm
        " sha256:" + "0" * 64,
        "sha256:" + "0" * 64 + " ",
        "sha256 " + "0" * 64,
        None,
        42,
        b"sha256:" + b"0" * 64,
        ["sha256:" + "0" * 64],
    ],
)
def test_is_digest_rejects(value):
    assert not is_digest(value)


def test_is_digest_rejects_trailing_newline():
    assert not is_digest("sha256:" + "0" * 64 + "\n")


@given(st.binary(max_size=100))
def test_sha256_digest_is_a_digest(data):
    d = sha256_digest(data)
    assert is_digest(d)
    assert d == "sha256:" + hashlib.sha256(data).hexdigest()


def test_short():
    d = "sha256:" + "0123456789abcdef" * 4
    assert short(d) == "0123456789ab"
    assert short(d, 4) == "0123"
    assert short(d, 64) == "0123456789abcdef" * 4
