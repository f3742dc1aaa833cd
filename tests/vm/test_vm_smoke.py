"""Smoke tests for the VM step (tests/vm/run.py): the kernel features it exists for.

Marked ``vm``: run inside the QEMU VM by ``make test``, and on the host too,
where they skip when the host kernel lacks the feature.  Inside the VM
(LAYERFS_IN_VM=1) a missing feature is a failure, not a skip: the VM step
must not pass silently without device-mapper or project quotas.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess

import pytest

IN_VM = os.environ.get("LAYERFS_IN_VM") == "1"

pytestmark = pytest.mark.vm


def missing(reason: str):
    """Skip on a host without the feature; fail inside the VM, where it must be there."""
    if IN_VM:
        pytest.fail(f"inside the VM: {reason}")
    pytest.skip(reason)


# struct dm_ioctl (linux/dm-ioctl.h): u32 version[3], data_size, data_start,
# target_count; s32 open_count; u32 flags, event_nr, padding; u64 dev;
# char name[128], uuid[129], data[7]  -> 312 bytes.
DM_IOCTL = struct.Struct("=3I3Ii3IQ128s129s7s")
assert DM_IOCTL.size == 312
DM_VERSION = (3 << 30) | (DM_IOCTL.size << 16) | (0xFD << 8) | 0  # _IOWR(0xfd, 0, struct dm_ioctl)
assert DM_VERSION == 0xC138FD00


def dm_version() -> tuple[int, int, int]:
    """The kernel's device-mapper ioctl interface version, via DM_VERSION on /dev/mapper/control."""
    buf = bytearray(DM_IOCTL.pack(4, 0, 0, DM_IOCTL.size, DM_IOCTL.size, 0, 0, 0, 0, 0, 0, b"", b"", b""))
    fd = os.open("/dev/mapper/control", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, DM_VERSION, buf, True)
    finally:
        os.close(fd)
    fields = DM_IOCTL.unpack(bytes(buf))
    return fields[0], fields[1], fields[2]


def test_device_mapper_answers_dm_version():
    try:
        major, minor, patch = dm_version()
    except OSError as e:
        # ENOENT: no node; ENODEV/ENXIO: node without a driver (these hosts)
        missing(f"no working device-mapper: /dev/mapper/control: {os.strerror(e.errno)}")
    assert major == 4, (major, minor, patch)
    assert minor >= 27  # thin provisioning messages used by the devicemapper driver


def test_xfs_loop_image_mounts_with_project_quota(tmp_path):
    if os.geteuid() != 0:
        missing("needs root for loop mounts")
    for tool in ("mkfs.xfs", "xfs_quota", "mount", "umount"):
        if not shutil.which(tool):
            missing(f"{tool} not installed")
    image, mnt = tmp_path / "xfs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(320 << 20)  # mkfs.xfs refuses filesystems under 300 MB
    subprocess.run(["mkfs.xfs", "-q", "-f", str(image)], check=True)
    p = subprocess.run(["mount", "-o", "loop,pquota", str(image), str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        missing(f"mount -o pquota on an xfs loop image: {(p.stderr.strip().splitlines() or ['failed'])[0]}")
    try:
        opts = next(line.split()[3] for line in open("/proc/self/mounts") if line.split()[1] == str(mnt))
        assert "prjquota" in opts.split(","), opts
        # A 1 MiB project quota on a directory is enforced.
        d = mnt / "limited"
        d.mkdir()
        for cmd in (f"project -s -p {d} 42", "limit -p bhard=1m 42"):
            subprocess.run(["xfs_quota", "-x", "-c", cmd, str(mnt)], check=True, capture_output=True)
        with pytest.raises(OSError) as info:
            with open(d / "fill", "wb") as f:
                for _ in range(4):
                    f.write(b"\1" * (1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
        assert info.value.errno in (errno.EDQUOT, errno.ENOSPC)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_vm_devices():
    """Inside the VM: the spare disks and enough loop devices (nothing to check on a host)."""
    if not IN_VM:
        pytest.skip("only meaningful inside the VM")
    for dev in os.environ["LAYERFS_VM_SPARE_DISKS"].split():
        assert os.path.exists(dev), dev
        with open(dev, "rb") as f:
            assert f.read(4096) == bytes(4096), f"{dev} is not blank"
    loops = [n for n in os.listdir("/dev") if n.startswith("loop") and n[4:].isdigit()]
    assert len(loops) >= 16, sorted(loops)
    assert os.environ["TMPDIR"] and os.path.isdir(os.environ["TMPDIR"])
