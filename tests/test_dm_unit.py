"""Host-side unit tests of the devicemapper driver's pure parts: no kernel device-mapper needed.

The byte images in KNOWN were produced by a C program built against Debian 12's
linux-libc-dev <linux/dm-ioctl.h> (interface 4.47), filling struct dm_ioctl,
struct dm_target_spec and struct dm_target_msg the way libdevmapper does:

  load:   DM_TABLE_LOAD of "layerfs-test", one target 0 20971520 thin "253:0 7"
  msg:    DM_TARGET_MSG to "layerfs-pool", sector 0, "create_snap 2 1"
  remove: header only: target_count 3, flags DM_DEFERRED_REMOVE|DM_READONLY_FLAG,
          event_nr 0x0d4d0001, dev makedev(253, 5), name "n", uuid "LAYERFS-u"
"""

from __future__ import annotations

import os
import struct

import pytest

from layerfs.drivers.devicemapper import Config, DevicemapperDriver, dmioctl, pool
from layerfs.errors import DriverUnavailable, InvalidOption

KNOWN = {
    "load": (
        "040000001b00000000000000680100003801000001000000000000000000000000000000000000000000000000000000"
        "6c6179657266732d74657374000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000004001000000000000000030000000"
        "7468696e0000000000000000000000003235333a30203700"
    ),
    "msg": (
        "040000001b00000000000000500100003801000000000000000000000000000000000000000000000000000000000000"
        "6c6179657266732d706f6f6c000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "00000000000000000000000000000000000000000000000000000000000000006372656174655f736e61702032203100"
    ),
    "remove": (
        "040000001b00000000000000380100003801000003000000000000000100020001004d0d0000000005fd000000000000"
        "6e0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "00000000000000000000000000000000000000000000000000000000000000004c4159455246532d7500000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000"
    ),
}


def known(name: str) -> bytes:
    return bytes.fromhex("".join(KNOWN[name]))


def test_struct_sizes_match_the_kernel_header():
    assert dmioctl.HEADER.size == 312  # sizeof(struct dm_ioctl)
    assert dmioctl.SPEC.size == 40  # sizeof(struct dm_target_spec)
    assert dmioctl.NAME_LIST.size == 12  # offsetof(struct dm_name_list, name)
    assert dmioctl.MSG.size == 8  # offsetof(struct dm_target_msg, message)
    assert pool.LOOP_INFO64.size == 232 and pool.LOOP_CONFIG.size == 304


def test_ioctl_numbers_match_iowr():
    # _IOWR(0xfd, nr, struct dm_ioctl) as printed by the C program
    assert dmioctl.DM_VERSION == 0xC138FD00
    assert dmioctl.DM_LIST_DEVICES == 0xC138FD02
    assert dmioctl.DM_DEV_CREATE == 0xC138FD03
    assert dmioctl.DM_DEV_REMOVE == 0xC138FD04
    assert dmioctl.DM_DEV_SUSPEND == 0xC138FD06
    assert dmioctl.DM_DEV_STATUS == 0xC138FD07
    assert dmioctl.DM_TABLE_LOAD == 0xC138FD09
    assert dmioctl.DM_TABLE_CLEAR == 0xC138FD0A
    assert dmioctl.DM_TABLE_STATUS == 0xC138FD0C
    assert dmioctl.DM_TARGET_MSG == 0xC138FD0E
    assert (pool.LOOP_CONFIGURE, pool.LOOP_SET_FD, pool.LOOP_SET_STATUS64, pool.LOOP_CTL_GET_FREE) == (0x4C0A, 0x4C00, 0x4C04, 0x4C82)


def test_flags_match_the_kernel_header():
    assert dmioctl.READONLY_FLAG == 1 and dmioctl.SUSPEND_FLAG == 2
    assert dmioctl.STATUS_TABLE_FLAG == 16 and dmioctl.ACTIVE_PRESENT_FLAG == 32
    assert dmioctl.BUFFER_FULL_FLAG == 256 and dmioctl.SKIP_LOCKFS_FLAG == 1024 and dmioctl.NOFLUSH_FLAG == 2048
    assert dmioctl.DATA_OUT_FLAG == 1 << 16 and dmioctl.DEFERRED_REMOVE == 1 << 17


def test_table_load_buffer_is_byte_identical():
    targets = [dmioctl.Target(0, 20971520, "thin", dmioctl.thin_params("253:0", 7))]
    payload = dmioctl.pack_targets(targets)
    assert len(payload) == 48  # 40-byte spec + "253:0 7\0", 8-aligned
    buf = dmioctl.pack_request(name="layerfs-test", payload=payload, target_count=1)
    assert bytes(buf) == known("load")


def test_target_message_buffer_is_byte_identical():
    buf = dmioctl.pack_request(name="layerfs-pool", payload=dmioctl.pack_message(dmioctl.msg_create_snap(2, 1)))
    assert bytes(buf) == known("msg")


def test_header_fields_are_at_the_kernel_offsets():
    raw = dmioctl.pack_header(name="n", uuid="LAYERFS-u", target_count=3,
                              flags=dmioctl.DEFERRED_REMOVE | dmioctl.READONLY_FLAG,
                              event_nr=0x0D4D0001, dev=os.makedev(253, 5))
    assert raw == known("remove")
    hdr = dmioctl.unpack_header(raw)
    assert hdr.version == (4, 27, 0) and hdr.target_count == 3 and hdr.name == "n" and hdr.uuid == "LAYERFS-u"
    assert (os.major(hdr.dev), os.minor(hdr.dev)) == (253, 5)


def test_pack_request_reserves_room_for_the_answer():
    buf = dmioctl.pack_request(name="x", out_size=4096)
    hdr = dmioctl.unpack_header(bytes(buf))
    assert len(buf) == 312 + 4096 and hdr.data_size == len(buf) and hdr.data_start == 312


def test_names_too_long_or_with_nul_are_refused():
    dmioctl.pack_header(name="a" * 127)
    with pytest.raises(ValueError):
        dmioctl.pack_header(name="a" * 128)
    with pytest.raises(ValueError):
        dmioctl.pack_header(name="a\0b")
    with pytest.raises(ValueError):
        dmioctl.pack_targets([dmioctl.Target(0, 8, "x" * 16, "")])


def test_parse_targets_of_a_status_answer():
    # DM_TABLE_STATUS: `next` counts from the first spec (data_start), not from each spec.
    first = b"0 1/1024 0/2048 - rw discard_passdown queue_if_no_space - 1024\0"
    second = b"7 -\0"
    spec1_len = (40 + len(first) + 7) & ~7
    spec1 = struct.pack("=QQiI16s", 0, 1000, 0, spec1_len, b"thin-pool") + first
    spec1 += b"\0" * (spec1_len - len(spec1))
    spec2 = struct.pack("=QQiI16s", 1000, 8, 0, 0, b"thin") + second
    buf = bytes(312) + spec1 + spec2
    found = dmioctl.parse_targets(buf, 312, 2)
    assert [(t.start, t.length, t.type) for t in found] == [(0, 1000, "thin-pool"), (1000, 8, "thin")]
    assert found[0].params == first[:-1].decode() and found[1].params == "7 -"


def _name_record(dev: int, name: str, last: bool) -> bytes:
    # dev, next, name\0, then (8-aligned) event_nr, flags: as list_devices() in dm-ioctl.c writes them
    head = 12 + len(name) + 1
    body = struct.pack("=QI", dev, 0) + name.encode() + b"\0"
    body += b"\0" * (((head + 7) & ~7) - head) + struct.pack("=II", 3, 0)
    if not last:
        body = body[:8] + struct.pack("=I", len(body)) + body[12:]
    return body


def test_parse_name_list():
    data = _name_record(os.makedev(253, 0), "layerfs-abc-pool", False) + _name_record(os.makedev(253, 12), "vg-lv", True)
    assert dmioctl.parse_name_list(data) == {"layerfs-abc-pool": os.makedev(253, 0), "vg-lv": os.makedev(253, 12)}
    assert dmioctl.parse_name_list(struct.pack("=QI", 0, 0) + b"\0" * 4) == {}
    assert dmioctl.parse_name_list(b"") == {}


def test_table_and_message_strings():
    assert dmioctl.thin_pool_params("7:1", "7:0", 128) == "7:1 7:0 128 0 1 skip_block_zeroing"
    assert dmioctl.thin_pool_params("7:1", "7:0", 1024, 32768, ()) == "7:1 7:0 1024 32768 0"
    assert dmioctl.thin_params("253:0", 42) == "253:0 42"
    assert dmioctl.msg_create_thin(1) == "create_thin 1"
    assert dmioctl.msg_create_snap(5, 3) == "create_snap 5 3"
    assert dmioctl.msg_delete(5) == "delete 5"
    assert dmioctl.msg_set_transaction_id(4, 5) == "set_transaction_id 4 5"
    assert dmioctl.dev_string(os.makedev(253, 300)) == "253:300"
    with pytest.raises(ValueError):
        dmioctl.msg_create_thin(1 << 24)
    with pytest.raises(ValueError):
        dmioctl.thin_pool_params("7:1", "7:0", 100)  # not a multiple of 64 KiB


def test_parse_pool_and_thin_status():
    st = dmioctl.parse_pool_status("12 100/4096 900/1000 - rw discard_passdown queue_if_no_space - 1024")
    assert (st.transaction_id, st.metadata_used, st.metadata_total, st.data_used, st.data_total) == (12, 100, 4096, 900, 1000)
    assert st.mode == "rw" and not st.needs_check and st.data_percent == 90.0
    assert dmioctl.parse_pool_status("3 1/2 2/2 - out_of_data_space discard_passdown error_if_no_space needs_check 1").needs_check
    assert dmioctl.parse_pool_status("Fail").mode == "Fail"
    assert dmioctl.parse_thin_status("2048 4095") == (2048, 4095)
    assert dmioctl.parse_thin_status("0 -") == (0, None)


def test_options_are_validated_up_front_naming_the_option():
    cases = {
        "dm.fs": {"dm.fs": "btrfs"},
        "dm.basesize": {"dm.basesize": "lots"},
        "dm.min_free_space": {"dm.min_free_space": "150%"},
        "dm.use_deferred_removal": {"dm.use_deferred_removal": "maybe"},
        "dm.use_deferred_deletion": {"dm.use_deferred_deletion": "true"},
        "dm.thinpooldev": {"dm.thinpooldev": "vg/pool", "dm.directlvm_device": "/dev/vdb"},
        "dm.loopdatasize": {"dm.loopdatasize": "1G", "dm.thinpooldev": "vg/pool"},
        "dm.thinp_percent": {"dm.thinp_percent": "50"},
        "dm.thinp_metapercent": {"dm.directlvm_device": "/dev/vdb", "dm.thinp_percent": "95", "dm.thinp_metapercent": "10"},
        "dm.loopmetadatasize": {"dm.loopmetadatasize": "1M"},
        "dm.bogus": {"dm.bogus": "1"},
    }
    for option, opts in cases.items():
        with pytest.raises(InvalidOption, match=option.replace(".", r"\.")):
            DevicemapperDriver.validate_options(opts)


def test_option_defaults_follow_docker():
    cfg = Config.parse({})
    assert cfg.basesize == 10 << 30 and cfg.fs == "xfs" and cfg.min_free_space == 10
    assert not cfg.deferred_removal and not cfg.deferred_deletion and cfg.blkdiscard is None
    assert (cfg.thinp_percent, cfg.thinp_metapercent, cfg.thinp_autoextend_threshold, cfg.thinp_autoextend_percent) == (95, 1, 80, 20)
    assert cfg.loopdatasize == 100 << 30 and cfg.loopmetadatasize == 2 << 30
    cfg = Config.parse({"dm.min_free_space": "5%", "dm.fs": "ext4", "dm.basesize": "1G", "dm.mkfsarg": "-b 4096 -O ^has_journal",
                        "dm.use_deferred_removal": "true", "dm.use_deferred_deletion": "1"})
    assert cfg.min_free_space == 5 and cfg.fs == "ext4" and cfg.mkfsarg == ("-b", "4096", "-O", "^has_journal")
    assert cfg.deferred_removal and cfg.deferred_deletion


def test_probe_without_device_mapper_says_why(tmp_path):
    try:
        dmioctl.kernel_version()
    except OSError:
        with pytest.raises(DriverUnavailable, match="device-mapper"):
            DevicemapperDriver.probe(tmp_path)
    else:
        pytest.skip("this kernel has a working device-mapper")
