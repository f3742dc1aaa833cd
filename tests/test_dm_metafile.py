"""The devicemapper metadata's on-disk slots (layerfs.drivers.devicemapper.metafile): no kernel needed."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfs.drivers.devicemapper import metafile
from layerfs.drivers.devicemapper.metafile import HEADER, SlotFile, newest, pack_slot

payloads = st.binary(max_size=3000)


def newest_of(raw: bytes, slot_size: int):
    return newest(lambda n, off: raw[off:off + n], slot_size)


def alone(slot: bytes):
    """A file of *slot* and an empty second slot, read back."""
    size = metafile.slot_size_for(len(slot))
    got = newest_of(slot + bytes(2 * size - len(slot)), size)
    return None if got is None else got[1:]


@given(st.integers(min_value=0, max_value=2**64 - 1), payloads)
def test_a_slot_round_trips(generation, payload):
    raw = pack_slot(generation, payload)
    assert len(raw) % 4096 == 0
    assert alone(raw) == (generation, payload)


@given(payloads, st.data())
def test_any_damage_to_a_slot_is_detected(payload, data):
    raw = bytearray(pack_slot(7, payload))
    end = HEADER.size + len(payload)
    at = data.draw(st.integers(min_value=0, max_value=end - 1))
    raw[at] ^= data.draw(st.integers(min_value=1, max_value=255))
    assert alone(bytes(raw)) is None


@given(payloads, st.integers(min_value=0, max_value=4200))
def test_a_torn_newest_slot_falls_back_to_the_other(payload, keep):
    size = metafile.slot_size_for(len(payload))
    old, new = pack_slot(4, b'{"old": 1}'), pack_slot(5, payload)
    whole = bytearray(2 * size)
    whole[0:len(old)] = old
    torn = new[:keep]  # only the first *keep* bytes of the new save reached the disk
    whole[size:size + len(torn)] = torn
    got = newest_of(bytes(whole), size)
    if keep >= HEADER.size + len(payload):
        assert got == (1, 5, payload)
    else:
        assert got == (0, 4, b'{"old": 1}')


def test_saves_alternate_slots_and_the_newest_wins(tmp_path):
    f = SlotFile(tmp_path / "metadata.slots")
    assert f.read() is None
    for n in range(1, 6):
        f.write({"n": n})
        assert f.read() == {"n": n}
        raw = (tmp_path / "metadata.slots").read_bytes()
        size = len(raw) // 2
        index, generation, _ = newest_of(raw, size)
        assert (generation, index) == (n, (n - 1) % 2)
    assert os.path.getsize(tmp_path / "metadata.slots") == 2 * metafile.MIN_SLOT_SIZE


def test_a_save_that_outgrows_its_slot_rewrites_the_file(tmp_path):
    f = SlotFile(tmp_path / "metadata.slots")
    f.write({"small": True})
    big = {"devices": {f"layer{i:05d}": {"device_id": i, "size": 10 << 30} for i in range(2000)}}
    f.write(big)
    assert f.read() == big
    size = os.path.getsize(tmp_path / "metadata.slots") // 2
    assert size >= 2 * len(metafile.encode(big))
    f.write({"small": False})  # back to overwriting in place
    assert f.read() == {"small": False}
    assert os.path.getsize(tmp_path / "metadata.slots") == 2 * size
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.slots"]


def test_a_crash_in_the_middle_of_a_save_reads_the_previous_save(tmp_path):
    path = tmp_path / "metadata.slots"
    f = SlotFile(path)
    f.write({"n": 1})
    f.write({"n": 2})
    raw = bytearray(path.read_bytes())
    size = len(raw) // 2
    # the third save goes to slot 0; it is torn after its header
    third = pack_slot(3, metafile.encode({"n": 3}))
    raw[0:HEADER.size + 3] = third[:HEADER.size + 3]
    path.write_bytes(bytes(raw))
    assert f.read() == {"n": 2}
    f.write({"n": 4})  # the next save overwrites the torn slot, not the intact one
    assert f.read() == {"n": 4}
    assert newest_of(path.read_bytes(), size)[:2] == (0, 3)


def test_a_file_with_no_intact_slot_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metadata.slots"
    path.write_bytes(bytes(2 * metafile.MIN_SLOT_SIZE))
    with pytest.raises(ValueError, match="metadata.slots: neither slot holds an intact save"):
        SlotFile(path).read()
