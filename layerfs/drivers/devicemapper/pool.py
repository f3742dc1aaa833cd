"""Where the thin pool comes from: loop files, an existing LVM thin pool, or a disk layerfs sets up.

* loop-lvm (the default; tests and demos only): sparse ``data`` and
  ``metadata`` files in the driver's home on loop devices, and a
  ``thin-pool`` device-mapper target made directly over them (no LVM, as
  Docker's loop-lvm).  Loop devices are attached with ``LO_FLAGS_AUTOCLEAR``
  so removing the pool frees them; the metadata one also with direct I/O
  (the pool caches its metadata itself, and each pool commit then flushes
  less of the backing file), the data one through the page cache (the
  filesystems' reads, a mount's among them, would go to the disk each time).
* ``dm.thinpooldev=VG/POOL`` (or ``/dev/mapper/NAME``): an existing LVM thin
  pool, activated with lvm2 when it is not active.
* ``dm.directlvm_device=/dev/X``: layerfs makes a PV, a VG, a thin pool of
  ``dm.thinp_percent`` of it with metadata of ``dm.thinp_metapercent``, and an
  lvm profile for autoextend; then it is used as ``dm.thinpooldev``.

The lvm2 command-line tools are run with ``--reportformat json``.  When no
udev is running (containers, the test VM) they get a configuration that
makes them create device nodes themselves and wait for no udev events.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import InvalidOption, LayerfsError
from . import dmioctl
from .dmioctl import Control, Target

# linux/loop.h
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LOOP_SET_DIRECT_IO = 0x4C08
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LOOP_MAJOR = 7
# struct loop_info64: 5 x u64, 4 x u32, lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32], u64 lo_init[2]
LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: u32 fd, u32 block_size, struct loop_info64 info, u64 __reserved[8]
LOOP_CONFIG = struct.Struct(f"=II{LOOP_INFO64.size}s8Q")
assert LOOP_INFO64.size == 232 and LOOP_CONFIG.size == 304

LOOP_BLOCK_SECTORS = 128  # 64 KiB pool blocks for loop pools (Docker's default dm.blocksize)
NO_UDEV_CONFIG = (
    "activation{udev_sync=0 udev_rules=0 monitoring=0} "
    "devices{obtain_device_list_from_udev=0 use_devicesfile=0} global{use_lvmpolld=0}"
)

LOOP_WARNING = (
    "WARNING: the devicemapper driver is using loop devices (loop-lvm): fine for tests and demos, "
    "slow and unsafe for production. Use dm.directlvm_device=/dev/DISK (layerfs sets up an LVM thin pool) "
    "or dm.thinpooldev=VG/POOL."
)


class PoolFull(LayerfsError):
    """The thin pool has less free space than dm.min_free_space."""


class PoolError(LayerfsError):
    """The thin pool cannot be set up or used."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail  # a failed command's whole stderr


@dataclass
class Pool:
    kind: str             # "loop", "thinpooldev", "directlvm"
    name: str             # device-mapper name of the thin-pool target
    dev: int              # its dev_t
    block_sectors: int    # data block size
    source: str           # what the user named: files, VG/POOL, the disk
    lv: str | None = None  # VG/LV for LVM pools
    files: dict = field(default_factory=dict)
    set_up_now: bool = False  # this open attached the loop files and made the pool device

    @property
    def dev_string(self) -> str:
        return dmioctl.dev_string(self.dev)

    def extend_hint(self) -> str:
        if self.kind == "loop":
            return ("loop pools cannot grow in place: remove unused images and containers, or start a new store "
                    "with a larger dm.loopdatasize / dm.loopmetadatasize (better: dm.directlvm_device)")
        return (f"extend the pool: `lvextend -L +10G {self.lv}` (data) or `lvextend --poolmetadatasize +1G {self.lv}` "
                f"(metadata), after `vgextend` if its volume group is full; or remove unused images and containers")


# ------------------------------------------------------------------ loops
def attach_loop(path: Path, direct_io: bool = False) -> tuple[str, int, int]:
    """Attach *path* to a free loop device with autoclear: (device path, dev_t, open fd).

    Keep the fd open until something else holds the device (the pool's table
    load): autoclear detaches it at the last close.  With *direct_io* the
    device bypasses the page cache when the backing filesystem allows it (the
    kernel quietly stays buffered where it does not, e.g. tmpfs before 6.6).
    """
    flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_DIRECT_IO if direct_io else 0)
    backing = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(20):
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                devpath = f"/dev/loop{n}"
                if not os.path.exists(devpath):
                    os.mknod(devpath, 0o660 | stat.S_IFBLK, os.makedev(LOOP_MAJOR, n))
                lfd = os.open(devpath, os.O_RDWR | os.O_CLOEXEC)
                name = os.fsencode(os.path.abspath(path))[:63]
                info = LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, name, b"", b"", 0, 0)
                try:
                    try:
                        fcntl.ioctl(lfd, LOOP_CONFIGURE, LOOP_CONFIG.pack(backing, 0, info, *([0] * 8)))
                    except OSError as exc:
                        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                            raise
                        fcntl.ioctl(lfd, LOOP_SET_FD, backing)  # kernels before 5.8
                        fcntl.ioctl(lfd, LOOP_SET_STATUS64, info)
                        if direct_io:
                            try:
                                fcntl.ioctl(lfd, LOOP_SET_DIRECT_IO, 1)
                            except OSError:
                                pass  # stays buffered, as LOOP_CONFIGURE would leave it
                except OSError as exc:
                    os.close(lfd)
                    if exc.errno == errno.EBUSY:
                        continue  # another process took it first
                    raise
                return devpath, os.stat(devpath).st_rdev, lfd
            raise PoolError("no free loop device after 20 tries")
        finally:
            os.close(ctl)
    finally:
        os.close(backing)


def loop_backing_file(dev: int) -> str | None:
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


# --------------------------------------------------------------------- lvm
def _udev_running() -> bool:
    return os.path.exists("/run/udev/control")


def lvm(*args: str, json_report: bool = False) -> dict | str:
    """Run an lvm2 command; its JSON report when *json_report*."""
    cmd = ["lvm", *args]
    env = dict(os.environ)
    if not _udev_running():
        cmd[2:2] = ["--config", NO_UDEV_CONFIG]
        env["DM_DISABLE_UDEV"] = "1"
    if json_report:
        cmd[2:2] = ["--reportformat", "json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise PoolError("lvm2 is not installed (apt-get install lvm2)") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
        raise PoolError(f"`lvm {' '.join(args)}` failed: {detail[-1].strip()}", proc.stderr)
    return json.loads(proc.stdout) if json_report else proc.stdout


def lvs(target: str) -> dict | None:
    """One LV's report row, or None when there is no such LV."""
    try:
        out = lvm("lvs", "--units", "b", "--nosuffix", "-o",
                  "vg_name,lv_name,lv_attr,lv_size,data_percent,metadata_percent,lv_metadata_size,lv_profile",
                  target, json_report=True)
    except PoolError as exc:
        if "not found" in exc.detail or "Failed to find" in exc.detail:
            return None
        raise
    rows = out["report"][0]["lv"]
    return rows[0] if rows else None


def vg_devices(vg: str) -> list[str]:
    """The physical volumes of volume group *vg* (none when it does not exist)."""
    out = lvm("pvs", "-o", "pv_name,vg_name", json_report=True)
    return [row["pv_name"] for row in out["report"][0]["pv"] if row["vg_name"] == vg]


def _mangle(name: str) -> str:
    return name.replace("-", "--")


# ------------------------------------------------------------------ pools
def _pool_from_table(ctl: Control, name: str, kind: str, source: str, lv: str | None = None) -> Pool | None:
    info = ctl.info(name)
    if info is None or not info.active:
        return None
    table = ctl.table(name)
    if len(table) != 1 or table[0].type != "thin-pool":
        return None
    block = int(table[0].params.split()[2])
    return Pool(kind, name, info.dev, block, source, lv)


def setup_loop(ctl: Control, home: Path, prefix: str, data_size: int, meta_size: int) -> Pool:
    name = f"{prefix}-pool"
    d = home / "loop"
    d.mkdir(exist_ok=True)
    data, meta = d / "data", d / "metadata"
    files = {"data": str(data), "metadata": str(meta)}
    found = _pool_from_table(ctl, name, "loop", str(d))
    if found is not None:
        found.files = files
        return found
    if ctl.info(name) is not None:
        ctl.remove(name)  # a pool device without a live table: a crash during setup
    for path, size in ((data, data_size), (meta, meta_size)):
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(size)  # sparse; a zeroed metadata device is formatted by the kernel
    fds = []
    try:
        meta_dev_path, meta_dev, fd = attach_loop(meta, direct_io=True)
        fds.append(fd)
        data_dev_path, data_dev, fd = attach_loop(data)
        fds.append(fd)
        sectors = os.path.getsize(data) // dmioctl.SECTOR
        sectors -= sectors % LOOP_BLOCK_SECTORS
        # error_if_no_space: nothing can extend a loop pool, so a full one fails
        # writes at once rather than queueing them for 60 s.
        params = dmioctl.thin_pool_params(dmioctl.dev_string(meta_dev), dmioctl.dev_string(data_dev), LOOP_BLOCK_SECTORS,
                                          0, ("skip_block_zeroing", "error_if_no_space"))
        dev = ctl.create(name)
        try:
            ctl.load(name, [Target(0, sectors, "thin-pool", params)])
            ctl.resume(name)
        except BaseException:
            ctl.remove(name)
            raise
    finally:
        for fd in fds:
            os.close(fd)
    return Pool("loop", name, dev, LOOP_BLOCK_SECTORS, str(d), None, files, set_up_now=True)


def open_thinpooldev(ctl: Control, spec: str, kind: str = "thinpooldev") -> Pool:
    """An existing thin pool: VG/POOL (activated with lvm2 if needed) or a device-mapper name."""
    spec = spec.strip()
    if spec.startswith("/dev/mapper/") or "/" not in spec:
        name = spec.removeprefix("/dev/mapper/")
        pool = _pool_from_table(ctl, name, kind, spec) or _pool_from_table(ctl, name + "-tpool", kind, spec)
        if pool is None:
            raise PoolError(f"dm.thinpooldev={spec}: no active thin pool device-mapper device of that name")
        return pool
    parts = spec.removeprefix("/dev/").split("/")
    if len(parts) != 2 or not all(parts):
        raise InvalidOption(f"dm.thinpooldev={spec!r}: use VG/POOL or /dev/mapper/NAME")
    vg, lv = parts
    row = lvs(f"{vg}/{lv}")
    if row is None:
        raise PoolError(f"dm.thinpooldev={spec}: there is no logical volume {vg}/{lv} (see `lvs`)")
    if not row["lv_attr"].startswith("t"):
        raise PoolError(f"dm.thinpooldev={spec}: {vg}/{lv} is not a thin pool (lv_attr {row['lv_attr']})")
    base = f"{_mangle(vg)}-{_mangle(lv)}"
    pool = _pool_from_table(ctl, base + "-tpool", kind, spec, f"{vg}/{lv}") or _pool_from_table(ctl, base, kind, spec, f"{vg}/{lv}")
    if pool is None:
        lvm("lvchange", "-ay", f"{vg}/{lv}")
        pool = _pool_from_table(ctl, base + "-tpool", kind, spec, f"{vg}/{lv}") or _pool_from_table(ctl, base, kind, spec, f"{vg}/{lv}")
    if pool is None:
        raise PoolError(f"dm.thinpooldev={spec}: activated {vg}/{lv} but found no thin-pool device {base}-tpool or {base}")
    return pool


def disk_signature(device: str) -> str | None:
    """What blkid finds on *device* (a filesystem, partition table, PV ...), or None when it looks empty."""
    proc = subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True, text=True)
    if proc.returncode == 2:
        return None  # nothing found
    if proc.returncode != 0:
        raise PoolError(f"blkid -p {device} failed: {proc.stderr.strip() or proc.returncode}")
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return fields.get("TYPE") or fields.get("PTTYPE") or "unknown"


def profile_dir() -> Path:
    out = str(lvm("lvmconfig", "--typeconfig", "full", "config/profile_dir"))
    return Path(out.strip().split("=", 1)[1].strip().strip('"'))


def setup_directlvm(ctl: Control, home: Path, device: str, vg: str, percent: int, metapercent: int,
                    threshold: int, extend_percent: int) -> Pool:
    """Make (once) a PV, a VG and a thin pool with an autoextend profile on *device*; then open it."""
    state_file = home / "directlvm.json"
    lv = "thinpool"
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        state = None
    if state is not None:
        if os.path.realpath(state["device"]) != os.path.realpath(device):
            raise InvalidOption(
                f"dm.directlvm_device={device}: this store was set up on {state['device']}; "
                "pass that device (or nothing) or use another --root"
            )
        return open_thinpooldev(ctl, f"{state['vg']}/{state['lv']}", kind="directlvm")
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise InvalidOption(f"dm.directlvm_device={device}: no such device") from None
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidOption(f"dm.directlvm_device={device}: not a block device")
    on = vg_devices(vg)
    if on and os.path.realpath(device) not in {os.path.realpath(d) for d in on}:
        # A VG of this store's name left by an earlier store at the same root (the
        # name comes from the root's path and inode): never adopt it from another disk.
        raise InvalidOption(
            f"dm.directlvm_device={device}: volume group {vg}, left by an earlier store at this root, is on "
            f"{', '.join(on)}; pass dm.directlvm_device={on[0]}, or remove it (vgremove {vg}) if its data is not needed"
        )
    row = lvs(f"{vg}/{lv}")
    if on and (row is None or not row["lv_attr"].startswith("t")):
        # This store's VG on this disk, without its thin pool: a setup that stopped
        # halfway (no state file was written, and no layer can live in it). Start over.
        lvm("vgremove", "-ff", "-y", vg)
        row = None
    if row is None:
        sig = disk_signature(device)
        if sig is not None and sig != "LVM2_member":
            raise InvalidOption(
                f"dm.directlvm_device={device} holds a {sig} signature; layerfs only sets up an empty disk "
                f"(if its data is not needed: wipefs -a {device})"
            )
        if sig is None:
            lvm("pvcreate", "-y", device)
        lvm("vgcreate", vg, device)
        lvm("lvcreate", "--wipesignatures", "y", "-n", lv, vg, "-l", f"{percent}%VG")
        lvm("lvcreate", "--wipesignatures", "y", "-n", f"{lv}meta", vg, "-l", f"{metapercent}%VG")
        lvm("lvconvert", "-y", "--zero", "n", "-c", "512K", "--thinpool", f"{vg}/{lv}", "--poolmetadata", f"{vg}/{lv}meta")
        profile = f"{vg}-thinpool"
        pdir = profile_dir()
        pdir.mkdir(parents=True, exist_ok=True)
        (pdir / f"{profile}.profile").write_text(
            "activation {\n"
            f"\tthin_pool_autoextend_threshold={threshold}\n"
            f"\tthin_pool_autoextend_percent={extend_percent}\n"
            "}\n"
        )
        lvm("lvchange", "--metadataprofile", profile, f"{vg}/{lv}")
    pool = open_thinpooldev(ctl, f"{vg}/{lv}", kind="directlvm")
    pool.source = device
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"device": device, "vg": vg, "lv": lv}))
    os.replace(tmp, state_file)
    return pool


def pool_status(ctl: Control, pool: Pool, *, commit: bool = True) -> dmioctl.PoolStatus:
    """The pool's status line; ``commit=False`` skips the metadata commit the kernel does first."""
    targets = ctl.status(pool.name, flush=commit)
    if len(targets) != 1 or targets[0].type != "thin-pool":
        raise PoolError(f"device-mapper device {pool.name} is no longer a thin pool")
    return dmioctl.parse_pool_status(targets[0].params)


def teardown_loop(ctl: Control, pool: Pool) -> None:
    """Remove a loop pool's device (its loop devices autoclear)."""
    if pool.kind == "loop" and ctl.info(pool.name) is not None:
        ctl.remove(pool.name)
