"""The kernel device-mapper ioctl interface, from Python (no libdevmapper, no dmsetup).

Every call is one ``ioctl`` on ``/dev/mapper/control`` carrying a
``struct dm_ioctl`` header and, after it, a payload (target specs, a target
message) or room for the kernel's answer (device lists, status strings).

Source of the layouts and numbers: ``include/uapi/linux/dm-ioctl.h`` (Linux
6.1, interface 4.47; checked against Debian 12's ``linux-libc-dev`` with a C
program printing ``sizeof``/``offsetof`` and the ``_IOWR`` values)::

    struct dm_ioctl {              // 312 bytes, no implicit padding
        __u32 version[3];          //   0
        __u32 data_size;           //  12  total size of the buffer passed in
        __u32 data_start;          //  16  offset of the payload from the start
        __u32 target_count;        //  20
        __s32 open_count;          //  24
        __u32 flags;               //  28
        __u32 event_nr;            //  32  (udev cookie on create/resume/remove)
        __u32 padding;             //  36
        __u64 dev;                 //  40  huge_encode_dev(): glibc makedev() layout
        char  name[128];           //  48
        char  uuid[129];           // 176
        char  data[7];             // 305
    };
    struct dm_target_spec {        // 40 bytes, then the NUL-terminated params,
        __u64 sector_start;        //   padded so the next spec is 8-aligned
        __u64 length;
        __s32 status;
        __u32 next;                // load: from this spec; status: from the first spec
        char  target_type[16];
    };
    struct dm_name_list { __u64 dev; __u32 next; char name[]; };   // name at 12
    struct dm_target_msg { __u64 sector; char message[]; };        // message at 8

    DM_IOCTL = 0xfd; every command is _IOWR(0xfd, nr, struct dm_ioctl)
    = 0xc138fd00 | nr.

The pure functions (``pack_*``, ``parse_*``, table and message strings) need
no kernel and are unit-tested on the host; :class:`Control` does the ioctls.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

CONTROL_PATH = "/dev/mapper/control"
MAPPER_DIR = "/dev/mapper"

HEADER = struct.Struct("=3I3Ii3IQ128s129s7s")
SPEC = struct.Struct("=QQiI16s")
NAME_LIST = struct.Struct("=QI")  # dev, next; name follows at offset 12
MSG = struct.Struct("=Q")
assert HEADER.size == 312 and SPEC.size == 40

DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16
SECTOR = 512

# Interface version we speak: the kernel refuses another major and any minor
# newer than its own, and answers with its version.  4.27 (Linux 3.13) added
# deferred removal, the newest feature used here.
INTERFACE = (4, 27, 0)

# enum in dm-ioctl.h
VERSION_CMD, REMOVE_ALL_CMD, LIST_DEVICES_CMD = 0, 1, 2
DEV_CREATE_CMD, DEV_REMOVE_CMD, DEV_RENAME_CMD, DEV_SUSPEND_CMD, DEV_STATUS_CMD, DEV_WAIT_CMD = 3, 4, 5, 6, 7, 8
TABLE_LOAD_CMD, TABLE_CLEAR_CMD, TABLE_DEPS_CMD, TABLE_STATUS_CMD = 9, 10, 11, 12
LIST_VERSIONS_CMD, TARGET_MSG_CMD = 13, 14

# flags
READONLY_FLAG = 1 << 0
SUSPEND_FLAG = 1 << 1
PERSISTENT_DEV_FLAG = 1 << 3
STATUS_TABLE_FLAG = 1 << 4
ACTIVE_PRESENT_FLAG = 1 << 5
INACTIVE_PRESENT_FLAG = 1 << 6
BUFFER_FULL_FLAG = 1 << 8
SKIP_BDGET_FLAG = 1 << 9
SKIP_LOCKFS_FLAG = 1 << 10
NOFLUSH_FLAG = 1 << 11
QUERY_INACTIVE_TABLE_FLAG = 1 << 12
UEVENT_GENERATED_FLAG = 1 << 13
UUID_FLAG = 1 << 14
DATA_OUT_FLAG = 1 << 16
DEFERRED_REMOVE = 1 << 17

_IOC_WRITE, _IOC_READ = 1, 2


def iowr(type_: int, nr: int, size: int) -> int:
    """_IOWR(type, nr, size) from asm-generic/ioctl.h."""
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (type_ << 8) | nr


def dm_cmd(nr: int) -> int:
    return iowr(0xFD, nr, HEADER.size)


DM_VERSION = dm_cmd(VERSION_CMD)
DM_LIST_DEVICES = dm_cmd(LIST_DEVICES_CMD)
DM_DEV_CREATE = dm_cmd(DEV_CREATE_CMD)
DM_DEV_REMOVE = dm_cmd(DEV_REMOVE_CMD)
DM_DEV_SUSPEND = dm_cmd(DEV_SUSPEND_CMD)
DM_DEV_STATUS = dm_cmd(DEV_STATUS_CMD)
DM_TABLE_LOAD = dm_cmd(TABLE_LOAD_CMD)
DM_TABLE_CLEAR = dm_cmd(TABLE_CLEAR_CMD)
DM_TABLE_STATUS = dm_cmd(TABLE_STATUS_CMD)
DM_TARGET_MSG = dm_cmd(TARGET_MSG_CMD)

_CMD_NAMES = {
    DM_VERSION: "DM_VERSION", DM_LIST_DEVICES: "DM_LIST_DEVICES", DM_DEV_CREATE: "DM_DEV_CREATE",
    DM_DEV_REMOVE: "DM_DEV_REMOVE", DM_DEV_SUSPEND: "DM_DEV_SUSPEND", DM_DEV_STATUS: "DM_DEV_STATUS",
    DM_TABLE_LOAD: "DM_TABLE_LOAD", DM_TABLE_CLEAR: "DM_TABLE_CLEAR", DM_TABLE_STATUS: "DM_TABLE_STATUS",
    DM_TARGET_MSG: "DM_TARGET_MSG",
}


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _name_bytes(name: str, limit: int, what: str) -> bytes:
    raw = name.encode()
    if len(raw) >= limit or b"\0" in raw:
        raise ValueError(f"device-mapper {what} {name!r} is longer than {limit - 1} bytes or holds a NUL")
    return raw


# --------------------------------------------------------------------- packing
@dataclass(frozen=True)
class Header:
    version: tuple[int, int, int]
    data_size: int
    data_start: int
    target_count: int
    open_count: int
    flags: int
    event_nr: int
    dev: int
    name: str
    uuid: str


def pack_header(*, name: str = "", uuid: str = "", flags: int = 0, data_size: int = HEADER.size,
                data_start: int = HEADER.size, target_count: int = 0, event_nr: int = 0, dev: int = 0,
                version: tuple[int, int, int] = INTERFACE) -> bytes:
    return HEADER.pack(
        *version, data_size, data_start, target_count, 0, flags, event_nr, 0, dev,
        _name_bytes(name, DM_NAME_LEN, "name"), _name_bytes(uuid, DM_UUID_LEN, "uuid"), b"",
    )


def unpack_header(buf: bytes) -> Header:
    f = HEADER.unpack_from(buf)
    return Header(tuple(f[0:3]), f[3], f[4], f[5], f[6], f[7], f[8], f[10], _cstr(f[11]), _cstr(f[12]))


def pack_request(*, name: str = "", uuid: str = "", flags: int = 0, payload: bytes = b"",
                 target_count: int = 0, out_size: int = 0, event_nr: int = 0, dev: int = 0) -> bytearray:
    """A whole ioctl buffer: header, payload, then room for *out_size* bytes of answer."""
    total = HEADER.size + max(len(payload), out_size)
    buf = bytearray(total)
    buf[: HEADER.size] = pack_header(name=name, uuid=uuid, flags=flags, data_size=total, target_count=target_count,
                                     event_nr=event_nr, dev=dev)
    buf[HEADER.size : HEADER.size + len(payload)] = payload
    return buf


@dataclass(frozen=True)
class Target:
    start: int      # sectors
    length: int     # sectors
    type: str
    params: str
    status: int = 0


def pack_targets(targets: list[Target]) -> bytes:
    """dm_target_spec records for DM_TABLE_LOAD (``next`` relative to each spec)."""
    out = bytearray()
    for t in targets:
        params = t.params.encode() + b"\0"
        size = _align8(SPEC.size + len(params))
        ttype = _name_bytes(t.type, DM_MAX_TYPE_NAME, "target type")
        out += SPEC.pack(t.start, t.length, 0, size, ttype)
        out += params + b"\0" * (size - SPEC.size - len(params))
    return bytes(out)


def parse_targets(buf: bytes, data_start: int, count: int) -> list[Target]:
    """dm_target_spec records of a DM_TABLE_STATUS answer (``next`` relative to the first spec)."""
    found = []
    off = data_start
    for _ in range(count):
        start, length, status, nxt, ttype = SPEC.unpack_from(buf, off)
        params = _cstr(buf[off + SPEC.size : data_start + nxt if nxt else len(buf)])
        found.append(Target(start, length, _cstr(ttype), params, status))
        off = data_start + nxt
    return found


def pack_message(message: str, sector: int = 0) -> bytes:
    return MSG.pack(sector) + message.encode() + b"\0"


def parse_name_list(data: bytes) -> dict[str, int]:
    """name -> dev of a DM_LIST_DEVICES answer (the bytes from data_start on).

    Records are chained by ``next`` (from the start of each record, 0 ends
    the list); an empty list is one record with dev 0.
    """
    found: dict[str, int] = {}
    off = 0
    while off + NAME_LIST.size <= len(data):
        dev, nxt = NAME_LIST.unpack_from(data, off)
        if dev == 0:
            break
        found[_cstr(data[off + 12 :])] = dev
        if nxt == 0:
            break
        off += nxt
    return found


# ------------------------------------------------------------- table strings
def dev_string(dev: int) -> str:
    """A block device as device-mapper tables name it: major:minor."""
    return f"{os.major(dev)}:{os.minor(dev)}"


def thin_pool_params(metadata_dev: str, data_dev: str, block_sectors: int, low_water_blocks: int = 0,
                     features: tuple[str, ...] = ("skip_block_zeroing",)) -> str:
    """Parameters of a ``thin-pool`` target (Documentation/admin-guide/device-mapper/thin-provisioning.rst)."""
    if block_sectors < 128 or block_sectors > 2097152 or block_sectors % 128:
        raise ValueError(f"thin-pool block size must be a multiple of 64 KiB between 64 KiB and 1 GiB, not {block_sectors} sectors")
    feats = f" {len(features)} {' '.join(features)}" if features else " 0"
    return f"{metadata_dev} {data_dev} {block_sectors} {low_water_blocks}{feats}"


def thin_params(pool_dev: str, device_id: int) -> str:
    """Parameters of a ``thin`` target: the pool device and the thin device id."""
    return f"{pool_dev} {device_id}"


MAX_DEVICE_ID = (1 << 24) - 1


def _check_id(device_id: int) -> int:
    if not 0 <= device_id <= MAX_DEVICE_ID:
        raise ValueError(f"thin device id {device_id} is outside 0..{MAX_DEVICE_ID}")
    return device_id


def msg_create_thin(device_id: int) -> str:
    return f"create_thin {_check_id(device_id)}"


def msg_create_snap(device_id: int, origin_id: int) -> str:
    return f"create_snap {_check_id(device_id)} {_check_id(origin_id)}"


def msg_delete(device_id: int) -> str:
    return f"delete {_check_id(device_id)}"


def msg_set_transaction_id(current: int, new: int) -> str:
    return f"set_transaction_id {current} {new}"


MSG_CANCEL_DEFERRED_REMOVE = "@cancel_deferred_remove"
MSG_RESERVE_METADATA_SNAP = "reserve_metadata_snap"
MSG_RELEASE_METADATA_SNAP = "release_metadata_snap"


@dataclass(frozen=True)
class PoolStatus:
    transaction_id: int
    metadata_used: int   # metadata blocks (4 KiB)
    metadata_total: int
    data_used: int       # data blocks (the pool's block size)
    data_total: int
    mode: str            # rw, ro, out_of_data_space, Fail
    needs_check: bool

    @property
    def data_percent(self) -> float:
        return 100.0 * self.data_used / self.data_total if self.data_total else 100.0

    @property
    def metadata_percent(self) -> float:
        return 100.0 * self.metadata_used / self.metadata_total if self.metadata_total else 100.0


def parse_pool_status(text: str) -> PoolStatus:
    """A ``thin-pool`` status line::

        <transaction id> <used meta>/<total meta> <used data>/<total data> <held root> ro|rw|out_of_data_space
        [no_]discard_passdown [error|queue]_if_no_space needs_check|- [metadata_low_watermark]
    """
    parts = text.split()
    if parts and parts[0] == "Fail":
        return PoolStatus(0, 0, 0, 0, 0, "Fail", True)
    if len(parts) < 5:
        raise ValueError(f"unexpected thin-pool status {text!r}")
    mu, mt = (int(x) for x in parts[1].split("/"))
    du, dt = (int(x) for x in parts[2].split("/"))
    return PoolStatus(int(parts[0]), mu, mt, du, dt, parts[4], "needs_check" in parts[5:])


def parse_thin_status(text: str) -> tuple[int, int | None]:
    """A ``thin`` status line: (mapped sectors, highest mapped sector or None)."""
    parts = text.split()
    if not parts or parts[0] == "Fail":
        raise ValueError(f"thin device failed: {text!r}")
    highest = None if len(parts) < 2 or parts[1] == "-" else int(parts[1])
    return int(parts[0]), highest


# ------------------------------------------------------------------- ioctls
class DMError(OSError):
    """A device-mapper ioctl failed; errno as the kernel returned it."""


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    dev: int
    open_count: int
    flags: int
    target_count: int
    event_nr: int

    @property
    def suspended(self) -> bool:
        return bool(self.flags & SUSPEND_FLAG)

    @property
    def active(self) -> bool:
        return bool(self.flags & ACTIVE_PRESENT_FLAG)

    @property
    def deferred_remove(self) -> bool:
        return bool(self.flags & DEFERRED_REMOVE)


class Control:
    """An open /dev/mapper/control: one method per ioctl used."""

    def __init__(self, path: str = CONTROL_PATH):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Control":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, cmd: int, what: str, **kw) -> tuple[Header, bytearray]:
        out_size = kw.pop("out_size", 0)
        retry = kw.pop("retry", True)
        while True:
            buf = pack_request(out_size=out_size, **kw)
            try:
                fcntl.ioctl(self.fd, cmd, buf, True)
            except OSError as exc:
                raise DMError(exc.errno, f"{_CMD_NAMES.get(cmd, hex(cmd))} {what}: {os.strerror(exc.errno)}") from None
            hdr = unpack_header(buf)
            if retry and hdr.flags & BUFFER_FULL_FLAG and out_size < (1 << 24):
                out_size = max(out_size * 4, 16384)
                continue
            return hdr, buf

    def version(self) -> tuple[int, int, int]:
        hdr, _ = self._call(DM_VERSION, "")
        return hdr.version

    def list_devices(self) -> dict[str, int]:
        hdr, buf = self._call(DM_LIST_DEVICES, "", out_size=16384)
        if hdr.data_size <= hdr.data_start:
            return {}
        return parse_name_list(bytes(buf[hdr.data_start : hdr.data_size]))

    def create(self, name: str, uuid: str = "") -> int:
        """A new device without a table (its dev_t is returned)."""
        hdr, _ = self._call(DM_DEV_CREATE, name, name=name, uuid=uuid)
        return hdr.dev

    def load(self, name: str, targets: list[Target], readonly: bool = False) -> None:
        """Load an inactive table; resume() makes it live."""
        self._call(DM_TABLE_LOAD, name, name=name, payload=pack_targets(targets), target_count=len(targets),
                   flags=READONLY_FLAG if readonly else 0)

    def suspend(self, name: str, *, flush: bool = True, lockfs: bool = True) -> None:
        flags = SUSPEND_FLAG | (0 if flush else NOFLUSH_FLAG) | (0 if lockfs else SKIP_LOCKFS_FLAG)
        self._call(DM_DEV_SUSPEND, name, name=name, flags=flags)

    def resume(self, name: str) -> None:
        self._call(DM_DEV_SUSPEND, name, name=name)

    def remove(self, name: str, *, deferred: bool = False) -> bool:
        """Remove a device; with *deferred* a busy one goes when its last user closes it.

        Returns False when the removal was deferred (the device is still there).
        """
        self._call(DM_DEV_REMOVE, name, name=name, flags=DEFERRED_REMOVE if deferred else 0)
        if not deferred:
            return True
        info = self.info(name)
        return info is None

    def info(self, name: str) -> DeviceInfo | None:
        """DM_DEV_STATUS, or None when there is no such device."""
        try:
            hdr, _ = self._call(DM_DEV_STATUS, name, name=name)
        except DMError as exc:
            if exc.errno == errno.ENXIO:
                return None
            raise
        return DeviceInfo(hdr.name, hdr.dev, hdr.open_count, hdr.flags, hdr.target_count, hdr.event_nr)

    def status(self, name: str, *, flush: bool = True) -> list[Target]:
        """Targets with their status strings (DM_TABLE_STATUS).

        A thin pool commits its metadata before it reports (writes and flushes its
        metadata device: most of the call's cost); ``flush=False``
        (DM_NOFLUSH_FLAG) reads the in-core counts as they are, which is what a
        free-space check needs.
        """
        hdr, buf = self._call(DM_TABLE_STATUS, name, name=name, flags=0 if flush else NOFLUSH_FLAG, out_size=4096)
        return parse_targets(bytes(buf[: hdr.data_size]), hdr.data_start, hdr.target_count)

    def table(self, name: str) -> list[Target]:
        """Targets with their table parameters (DM_TABLE_STATUS with DM_STATUS_TABLE_FLAG)."""
        hdr, buf = self._call(DM_TABLE_STATUS, name, name=name, flags=STATUS_TABLE_FLAG, out_size=4096)
        return parse_targets(bytes(buf[: hdr.data_size]), hdr.data_start, hdr.target_count)

    def message(self, name: str, message: str, sector: int = 0) -> str:
        """Send a target message; returns the target's answer text if any (DM_DATA_OUT_FLAG)."""
        hdr, buf = self._call(DM_TARGET_MSG, f"{name} {message!r}", name=name, payload=pack_message(message, sector),
                              out_size=4096, retry=False)  # a message must never be sent twice
        if hdr.flags & DATA_OUT_FLAG:
            return _cstr(bytes(buf[hdr.data_start : hdr.data_size]))
        return ""


def kernel_version(path: str = CONTROL_PATH) -> tuple[int, int, int]:
    """The device-mapper interface version (DM_VERSION); OSError when there is none."""
    with Control(path) as ctl:
        return ctl.version()
