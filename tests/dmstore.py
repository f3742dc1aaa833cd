"""devicemapper stores for tests: cheap enough to give every test a fresh one in the VM.

Making a devicemapper store sets up a loop thin pool and formats its base
device (mkfs.xfs writes a 64 MiB log): ~1.7 s under the VM's TCG emulation,
which is most of a small test's cost.  So the first devicemapper test of a
session makes one *template* store (pool + formatted base, then every
device deactivated) and each test gets a fresh root seeded with a copy of
the template's pool files: the blocks that hold data are copied, holes and
all-zero blocks stay holes (the base's zeroed xfs log reads back the same).
The seeded store is a real, independent store: its own loop devices, its
own pool device (device-mapper names come from the home's path and inode),
its own metadata file; what it skips is only running mkfs again.

On a host without device-mapper every function here skips (raises
pytest.skip); inside the VM (LAYERFS_IN_VM=1) a missing device-mapper is a
failure instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_VM = os.environ.get("LAYERFS_IN_VM") == "1"

#: Small enough for the VM: xfs needs >= 300M; the loop files are sparse.
SMALL = {"dm.basesize": "512M", "dm.loopdatasize": "2G", "dm.loopmetadatasize": "16M"}

_BLOCK = 64 << 10   # the loop pool's data block size
_ZERO = bytes(_BLOCK)


def missing(reason: str):
    if IN_VM:
        pytest.fail(f"inside the VM: {reason}")
    pytest.skip(reason)


def require_dm() -> None:
    if os.geteuid() != 0:
        missing("devicemapper tests need root")
    from layerfs.drivers.devicemapper import dmioctl

    try:
        dmioctl.kernel_version()
    except OSError as e:
        missing(f"no working device-mapper: {dmioctl.CONTROL_PATH}: {os.strerror(e.errno)}")


def scratch(tmp_path: Path) -> Path:
    """A fresh directory on a disk-backed filesystem in the VM (tmp_path elsewhere).

    The VM's tmp_path is a small tmpfs; loop files and thin_ls (O_DIRECT) want a disk.
    """
    disk = os.environ.get("LAYERFS_VM_DISK_SCRATCH")
    if not disk:
        return tmp_path
    d = Path(disk) / tmp_path.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def teardown_home(home: Path) -> None:
    """Unmount and deactivate every device of the store at *home* and its loop pool."""
    from conftest import detach_mounts_under
    from layerfs.drivers.devicemapper import DevicemapperDriver, dmioctl
    from layerfs.drivers.devicemapper.config import pool_prefix
    from layerfs.drivers.devicemapper.txn import METADATA_FILE

    detach_mounts_under(home)
    if not (home / METADATA_FILE).exists():
        return
    with dmioctl.Control() as ctl:
        prefix = pool_prefix(home) + "-"
        if not any(n.startswith(prefix) for n in ctl.list_devices()):
            return  # nothing active (the store was never opened, or was shut down)
    drv = DevicemapperDriver(home, {})
    try:
        drv.deactivate_all()
    finally:
        drv.close()


def make_template(where: Path) -> Path:
    """A devicemapper home with a loop pool and a formatted base, every device deactivated."""
    from layerfs.drivers.devicemapper import DevicemapperDriver

    home = where / "devicemapper"
    home.mkdir(parents=True)
    drv = DevicemapperDriver(home, SMALL)
    try:
        drv.deactivate_all()
    finally:
        drv.close()
    return home


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy *src*'s data blocks; holes and all-zero blocks stay holes in *dst*."""
    from conformance import data_extents

    with open(src, "rb") as f, open(dst, "wb") as g:
        fd, out = f.fileno(), g.fileno()
        g.truncate(os.fstat(fd).st_size)
        for off, end in data_extents(fd):
            while off < end:
                buf = os.pread(fd, min(4 << 20, end - off), off)
                if not buf:
                    break
                for i in range(0, len(buf), _BLOCK):
                    chunk = buf[i:i + _BLOCK]
                    if chunk != _ZERO[:len(chunk)]:
                        os.pwrite(out, chunk, off + i)
                off += len(buf)


def seed(template: Path, home: Path) -> None:
    """Make *home* a copy of the template store (its own names, loop devices and pool)."""
    from layerfs.drivers.devicemapper.config import pool_prefix
    from layerfs.drivers.devicemapper.metafile import SlotFile
    from layerfs.drivers.devicemapper.txn import METADATA_FILE

    home.mkdir(parents=True)
    (home / "mnt").mkdir()
    (home / "loop").mkdir()
    for name in ("data", "metadata"):
        _copy_sparse(template / "loop" / name, home / "loop" / name)
    meta = SlotFile(template / METADATA_FILE).read()
    meta["pool"]["source"] = str(home / "loop")
    meta["pool"]["name"] = f"{pool_prefix(home)}-pool"
    SlotFile(home / METADATA_FILE).write(meta)


@pytest.fixture(scope="session")
def dm_template(tmp_path_factory):
    """The session's template devicemapper home (made at the first devicemapper test)."""
    require_dm()
    where = scratch(tmp_path_factory.mktemp("dm-template"))
    home = make_template(where)
    yield home
    teardown_home(home)
    shutil.rmtree(where, ignore_errors=True)
