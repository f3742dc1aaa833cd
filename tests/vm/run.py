#!/usr/bin/env python3
"""Run the ``vm``-marked tests inside a QEMU (TCG) VM booting a stock Debian kernel.

The host kernel of these machines lacks device-mapper and XFS/ext4 quota
support; this boots the kernel of Debian's ``linux-image-amd64`` under QEMU's
software emulation (never KVM) with the host's ``/`` shared read-only over 9p
under a tmpfs overlay, runs pytest inside as root and hands its exit status
and junit XML back.  See tests/vm/README.md.

    .venv/bin/python tests/vm/run.py [--marker EXPR] [--junit FILE] [-- pytest args]

Exit status: pytest's own (0 passed, 1 failed, 5 nothing collected, ...),
124 when the VM timed out, 125 when the VM step itself could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
INIT_SCRIPT = HERE / "init.sh"

#: Bumped when the initramfs layout changes in a way its inputs do not show.
INITRAMFS_FORMAT = 1

#: Modules loaded at boot, in this order, with their dependencies (resolved
#: with modprobe --show-depends).  Missing ones are skipped with a note.
BOOT_MODULES = [
    "virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "overlay",
    "loop", "ext4", "xfs", "quota_v2",
    "dm_mod", "dm_thin_pool", "dm_snapshot", "dm_bufio", "fuse",
]
MODULE_PARAMS = {"loop": "max_loop=16"}

EXIT_TIMEOUT = 124
EXIT_VM_ERROR = 125

GUEST_DIR = "/run/layerfs-vm"          # see init.sh
SPARE_DISKS = ("vdb", "vdc")


class VMError(Exception):
    """The VM step cannot run; the message is one line saying why."""


def log(msg: str) -> None:
    print(f"vm: {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)
    except FileNotFoundError:
        raise VMError(f"{cmd[0]} not found (run `make setup`)") from None
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or e.stdout or "").strip().splitlines()
        raise VMError(f"`{shlex.join(cmd)}` failed: {detail[-1] if detail else f'exit {e.returncode}'}") from None


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not path:
        raise VMError(f"{name} not found: install {package} (`make setup` does)")
    return path


# ------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    if os.environ.get("LAYERFS_VM_CACHE"):
        return Path(os.environ["LAYERFS_VM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerfs-vm"


@contextlib.contextmanager
def locked(cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel image linux-image-amd64 depends on."""
    out = run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    m = re.search(r"^\s*Depends:\s*(linux-image-\S+)", out, re.M)
    if not m:
        raise VMError("apt-cache: linux-image-amd64 depends on no linux-image-* package")
    pkg = m.group(1)
    show = run(["apt-cache", "show", "--no-all-versions", pkg]).stdout
    v = re.search(r"^Version:\s*(\S+)", show, re.M)
    if not v:
        raise VMError(f"apt-cache show {pkg}: no Version")
    return pkg, v.group(1)


def fetch_kernel(cache: Path) -> Path:
    """Unpacked kernel dir (root/, vmlinux, kver), downloading it when not cached."""
    kdir_root = cache / "kernel"
    try:
        pkg, version = kernel_package()
    except VMError as e:
        # No apt metadata (offline?): fall back to whatever was unpacked before.
        done = sorted(kdir_root.glob("*/complete"), key=lambda p: p.stat().st_mtime)
        if not done:
            raise
        log(f"warning: {e}; using the cached {done[-1].parent.name}")
        return done[-1].parent
    kdir = kdir_root / f"{pkg}_{version}".replace(":", "%3a")
    if (kdir / "complete").exists():
        return kdir
    need_tool("dpkg-deb", "dpkg")
    need_tool("depmod", "kmod")
    log(f"fetching {pkg} {version} into {kdir_root} (once; about 70 MB)")
    t0 = time.monotonic()
    shutil.rmtree(kdir, ignore_errors=True)
    kdir.mkdir(parents=True)
    dl = kdir / "deb"
    dl.mkdir()
    cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{pkg}={version}"]
    try:
        run(cmd, cwd=dl)
    except VMError:
        # Stale package lists: the version they name is gone from the mirror.
        log("apt-get download failed; refreshing the package lists and retrying")
        run(["apt-get", "update", "-qq"])
        pkg, version = kernel_package()
        cmd[-1] = f"{pkg}={version}"
        run(cmd, cwd=dl)
    debs = list(dl.glob("*.deb"))
    if len(debs) != 1:
        raise VMError(f"apt-get download {pkg}: expected one .deb in {dl}, found {len(debs)}")
    root = kdir / "root"
    run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    debs[0].unlink()
    dl.rmdir()
    kvers = [p.name for p in (root / "lib/modules").iterdir()] if (root / "lib/modules").is_dir() else []
    if len(kvers) != 1:
        raise VMError(f"{pkg}: expected one lib/modules/<version> directory, found {kvers}")
    kver = kvers[0]
    run(["depmod", "-b", str(root), kver])
    vmlinuz = root / "boot" / f"vmlinuz-{kver}"
    (kdir / "vmlinux").write_bytes(decompress_vmlinuz(vmlinuz))
    (kdir / "kver").write_text(kver + "\n")
    (kdir / "complete").write_text(f"{pkg} {version}\n")
    # Older unpacked kernels are ~400 MB each: keep only this one.
    for old in kdir_root.iterdir():
        if old != kdir:
            shutil.rmtree(old, ignore_errors=True)
    log(f"kernel {kver} unpacked in {time.monotonic() - t0:.1f}s")
    return kdir


def decompress_vmlinuz(path: Path) -> bytes:
    """The uncompressed ELF vmlinux inside an xz-compressed bzImage (boots via PVH)."""
    data = path.read_bytes()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        raise VMError(f"{path}: no xz stream inside (not an xz-compressed bzImage)")
    try:
        out = lzma.LZMADecompressor().decompress(data[at:])
    except lzma.LZMAError as e:
        raise VMError(f"{path}: cannot decompress the kernel: {e}") from None
    if out[:4] != b"\x7fELF":
        raise VMError(f"{path}: decompressed kernel is not an ELF file")
    return out


# -------------------------------------------------------------- initramfs
def elf_is_static(path: str) -> bool:
    with open(path, "rb") as f:
        hdr = f.read(64)
        if hdr[:4] != b"\x7fELF" or hdr[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", hdr, 32)
        phentsize, phnum = struct.unpack_from("<HH", hdr, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def module_load_order(root: Path, kver: str) -> list[tuple[Path, str]]:
    """(module file, params) for BOOT_MODULES and their dependencies, deduplicated."""
    modprobe = need_tool("modprobe", "kmod")
    order: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for name in BOOT_MODULES:
        p = subprocess.run([modprobe, "-d", str(root), "-S", kver, "--show-depends", name],
                           text=True, capture_output=True)
        if p.returncode != 0:
            continue  # not a module in this kernel (built in, or absent)
        for line in p.stdout.splitlines():
            words = line.split()
            if len(words) < 2 or words[0] != "insmod":
                continue  # "builtin xxx"
            path = Path(words[1])
            if path in seen:
                continue
            seen.add(path)
            base = path.name.split(".ko")[0].replace("-", "_")
            order.append((path, MODULE_PARAMS.get(base, "")))
    return order


class Cpio:
    """A minimal newc archive writer (deterministic: mtime 0, owner root)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nb = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(nb), 0)
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08x" % v for v in fields)
        self.buf.write(hdr + nb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def build_initramfs(cache: Path, kdir: Path) -> Path:
    """The cached initramfs for this kernel, rebuilt when any of its inputs changed."""
    kver = (kdir / "kver").read_text().strip()
    root = kdir / "root"
    moddir = root / "lib/modules" / kver
    busybox = need_tool("busybox", "busybox-static")
    busybox = os.path.realpath(busybox)
    if not elf_is_static(busybox):
        raise VMError(f"{busybox} is dynamically linked: install busybox-static (`make setup` does)")
    order = module_load_order(root, kver)
    if not order:
        raise VMError(f"modprobe found none of the boot modules under {moddir}")
    conf = f"KVER={shlex.quote(kver)}\nMODDIR={shlex.quote(str(moddir))}\n"
    load_list = "".join(f"{p.name} {params}".rstrip() + "\n" for p, params in order)

    key = hashlib.sha256()
    for part in (str(INITRAMFS_FORMAT), conf, load_list, INIT_SCRIPT.read_text()):
        key.update(part.encode() + b"\0")
    for path in [Path(busybox)] + [p for p, _ in order]:
        st = path.stat()
        key.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    out = cache / f"initramfs-{key.hexdigest()[:16]}.cpio"
    if out.exists():
        return out

    t0 = time.monotonic()
    c = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
              "etc", "lib", "lib/modules", "modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    c.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    c.file("etc/layerfs-vm.conf", conf.encode())
    c.file("modules/load.list", load_list.encode())
    for p, _ in order:
        c.file(f"modules/{p.name}", p.read_bytes())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(c.finish())
    tmp.rename(out)
    for old in cache.glob("initramfs-*.cpio"):
        if old != out:
            old.unlink(missing_ok=True)
    log(f"initramfs built: {len(order)} modules, {out.stat().st_size >> 20} MiB, "
        f"{time.monotonic() - t0:.1f}s ({out.name})")
    return out


# --------------------------------------------------------------- the run
def clean_stale_runs(runs: Path) -> None:
    """Remove run dirs left by killed runs (their pid is gone)."""
    if not runs.is_dir():
        return
    for d in runs.iterdir():
        m = re.match(r"run-(\d+)-", d.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def make_disk(path: Path, size: int, mkfs: bool = False) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    if mkfs:
        mkfs_ext4 = need_tool("mkfs.ext4", "e2fsprogs")
        run([mkfs_ext4, "-q", "-F", "-L", "vmscratch", "-E", "lazy_itable_init=1,lazy_journal_init=1",
             str(path)])


def write_job(share: Path, marker: str, paths: list[str], extra: list[str], color: bool,
              command: str | None = None) -> None:
    python = REPO / ".venv" / "bin" / "python"
    cwd = Path.cwd()
    hidden = ("/proc", "/sys", "/dev", "/run")
    if any(str(cwd) == h or str(cwd).startswith(h + "/") for h in hidden):
        cwd = REPO
    cols = shutil.get_terminal_size((120, 24)).columns
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": os.environ.get("TERM", "dumb") if color else "dumb",
        "COLUMNS": str(cols),
        "TMPDIR": f"{GUEST_DIR}/tmp",
        "LAYERFS_IN_VM": "1",
        "LAYERFS_VM_SHARE": f"{GUEST_DIR}/share",
        "LAYERFS_VM_DISK_SCRATCH": f"{GUEST_DIR}/disk",
        "LAYERFS_VM_SPARE_DISKS": " ".join(f"/dev/{d}" for d in SPARE_DISKS),
        "DM_DISABLE_UDEV": "1",
        "PYTHONUNBUFFERED": "1",
    }
    pytest = [str(python), "-m", "pytest", "-m", marker, *paths,
              "-p", "no:cacheprovider", f"--junitxml={GUEST_DIR}/share/junit.xml",
              f"--color={'yes' if color else 'no'}", *extra]
    run_cmd = ["/bin/sh", "-c", command] if command else pytest
    lines = [
        "# written by tests/vm/run.py; run by the VM's init, chrooted into the host's root",
        f"cd {shlex.quote(str(cwd))} || exit 125",
        "exec 0</dev/null",
        "env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " \\",
        "    " + shlex.join(run_cmd),
        "rc=$?",
        f"[ $rc -eq 0 ] || dmesg >{GUEST_DIR}/share/dmesg.txt 2>&1",
        "exit $rc",
    ]
    (share / "job.sh").write_text("\n".join(lines) + "\n")


def preselect(marker: str, extra: list[str]) -> list[str]:
    """Test paths for the guest's pytest.

    Collecting the whole tree under TCG costs ~15x the host's time, so the
    host collects first (about 2 s) and the guest gets only the files that
    hold tests matching the marker; the guest still applies ``-m``.  Paths in
    the extra pytest arguments are used as given instead.  Falls back to the
    whole tests/ directory when the host collection fails.
    """
    if any(not a.startswith("-") and Path(a.split("::")[0]).exists() for a in extra):
        return []
    tests = str(REPO / "tests")
    p = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "pytest", "--collect-only", "-qq",
         "-m", marker, tests, "-p", "no:cacheprovider", "--continue-on-collection-errors"],
        cwd=REPO, capture_output=True, text=True)
    files = {}
    for line in p.stdout.splitlines():
        m = re.match(r"^(\S+\.py): (\d+)$", line.strip())
        if m:
            files[m.group(1)] = int(m.group(2))
    if p.returncode not in (0, 1, 2, 5) or not files:
        why = f"exit {p.returncode}" if p.returncode not in (0, 1, 2, 5) else "no tests matched"
        log(f"host pre-collection: {why}; the guest collects all of tests/")
        return [tests]
    log(f"host pre-collection: {sum(files.values())} tests in {len(files)} files match -m {shlex.quote(marker)}")
    return [str(REPO / f) for f in sorted(files)]


def qemu_command(kdir: Path, initramfs: Path, share: Path, disks: list[Path], args) -> list[str]:
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    append = " ".join([
        "console=ttyS0", "quiet", "panic=-1", "rdinit=/init", "loop.max_loop=16",
        f"LAYERFS_SCRATCH={args.scratch}",
        # 9p caching of the read-only host root: loose (fast; the host tree
        # must not change during the run) or none (coherent, slower).
        f"LAYERFS_9P_CACHE={os.environ.get('LAYERFS_VM_9P_CACHE', 'loose')}",
    ])
    cmd = [
        qemu, "-accel", "tcg,tb-size=512", "-cpu", "max", "-M", "pc",
        "-m", args.memory, "-smp", str(args.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0",
        "-kernel", str(kdir / "vmlinux"), "-initrd", str(initramfs), "-append", append,
    ]
    for i, disk in enumerate(disks):
        cmd += ["-drive", f"file={disk},if=none,id=disk{i},format=raw,cache=unsafe,discard=unmap",
                "-device", f"virtio-blk-pci,drive=disk{i},serial=layerfs-vm-{i}"]
    cmd += [
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={share},mount_tag=vmshare,security_model=none,multidevs=remap",
    ]
    return cmd


def boot(cmd: list[str], timeout: float) -> tuple[int | None, float | None, bool]:
    """Run QEMU, echoing the console; (qemu exit status, seconds to guest-ready, timed out)."""
    t0 = time.monotonic()
    ready: list[float] = []
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)

    def pump() -> None:
        assert proc.stdout is not None
        out = sys.stdout.buffer
        for line in proc.stdout:
            line = line.replace(b"\r\n", b"\n").replace(b"\r", b"")
            if not ready and line.startswith(b"layerfs-vm: ready at"):
                ready.append(time.monotonic() - t0)
                out.write(line)
                out.write(f"vm: booted in {ready[0]:.1f}s (QEMU start to guest ready)\n".encode())
            else:
                out.write(line)
            out.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)
    return proc.returncode, (ready[0] if ready else None), timed_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run pytest inside a QEMU (TCG) VM with a stock Debian kernel.",
        epilog="Arguments after -- go to pytest.  Exit status: pytest's, 124 on timeout, "
               "125 when the VM step cannot run.")
    ap.add_argument("--marker", "-m", default="vm", help="pytest -m expression (default: vm)")
    ap.add_argument("--junit", type=Path, help="copy the guest's junit XML here")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before QEMU is killed (default 900)")
    ap.add_argument("--memory", default="2G", help="guest RAM (default 2G)")
    ap.add_argument("--cpus", type=int, default=2, help="guest vCPUs (default 2)")
    ap.add_argument("--scratch", default="768m", help="size of the guest's tmpfs TMPDIR (default 768m)")
    ap.add_argument("--disk-size", default="2G", help="size of each spare disk /dev/vdb, /dev/vdc (default 2G)")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                    help="kernel and initramfs cache (default $LAYERFS_VM_CACHE or ~/.cache/layerfs-vm)")
    ap.add_argument("--cmd", help="run this shell command in the guest instead of pytest (debugging)")
    ap.add_argument("--results", type=Path, metavar="DIR",
                    help="copy what the guest wrote to $LAYERFS_VM_SHARE/results (e.g. benchmark results) "
                         "to DIR on the host")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    extra = args.pytest_args
    if extra and extra[0] == "--":
        extra = extra[1:]

    t_start = time.monotonic()
    # Why: QEMU runs in its own session (so the console is ours), so a SIGTERM
    # or SIGHUP to this process would otherwise leave it running; as an
    # interrupt, run_qemu's finally kills it and the run's files are removed.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        return run_vm(args, extra, t_start)
    except VMError as e:
        print(f"vm: error: {e}", file=sys.stderr, flush=True)
        return EXIT_VM_ERROR
    except KeyboardInterrupt:
        print("vm: interrupted", file=sys.stderr, flush=True)
        return 130


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: even after a SIGKILL of ours


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        raise VMError(f"bad size {text!r} (e.g. 2G, 512M)")
    return int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))


def run_vm(args, extra: list[str], t_start: float) -> int:
    cache = args.cache_dir.resolve()
    for hidden in ("/run", "/proc", "/sys", "/dev"):
        for what, path in (("the repository", REPO), ("the cache dir", cache)):
            if str(path) == hidden or str(path).startswith(hidden + "/"):
                raise VMError(f"{what} ({path}) is under {hidden}, which the VM mounts over; move it")
    python = REPO / ".venv" / "bin" / "python"
    if not os.access(python, os.X_OK):
        raise VMError(f"{python} missing: run `make setup` first")
    need_tool("qemu-system-x86_64", "qemu-system-x86")
    if os.geteuid() != 0:
        log("warning: not root; files only root can read on the host are unreadable in the guest")
    disk_size = parse_size(args.disk_size)
    if args.junit:
        args.junit.unlink(missing_ok=True)  # no stale results when this run fails early

    with locked(cache):
        kdir = fetch_kernel(cache)
        initramfs = build_initramfs(cache, kdir)
    kver = (kdir / "kver").read_text().strip()

    runs = cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    clean_stale_runs(runs)
    rundir = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=runs))
    try:
        share = rundir / "share"
        share.mkdir()
        disks = [rundir / "vda-scratch.img"] + [rundir / f"{d}.img" for d in SPARE_DISKS]
        make_disk(disks[0], 4 << 30, mkfs=True)
        for d in disks[1:]:
            make_disk(d, disk_size)
        color = sys.stdout.isatty()
        paths = [] if args.cmd else preselect(args.marker, extra)
        write_job(share, args.marker, paths, extra, color, args.cmd)
        cmd = qemu_command(kdir, initramfs, share, disks, args)
        prep = time.monotonic() - t_start
        log(f"booting Debian kernel {kver} under QEMU TCG ({args.cpus} vCPU, {args.memory}); "
            f"pytest -m {shlex.quote(args.marker)} (prepared in {prep:.1f}s)")
        t_boot = time.monotonic()
        qrc, ready, timed_out = boot(cmd, args.timeout)
        elapsed = time.monotonic() - t_boot

        if args.results and (share / "results").is_dir():
            shutil.copytree(share / "results", args.results, dirs_exist_ok=True)
            log(f"copied the guest's results to {args.results}")
        if args.junit and (share / "junit.xml").exists():
            args.junit.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(share / "junit.xml", args.junit)
        rc_file = share / "rc"
        if timed_out:
            print(f"vm: error: timed out after {args.timeout:.0f}s; QEMU killed", file=sys.stderr, flush=True)
            return EXIT_TIMEOUT
        if ready is None:
            print(f"vm: error: the guest never got ready (QEMU exit {qrc}); see the console output above",
                  file=sys.stderr, flush=True)
            return EXIT_VM_ERROR
        if not rc_file.exists():
            print(f"vm: error: the guest reported no exit status (QEMU exit {qrc}); "
                  f"see the console output above", file=sys.stderr, flush=True)
            return EXIT_VM_ERROR
        rc = int(rc_file.read_text().strip() or EXIT_VM_ERROR)
        dmesg = share / "dmesg.txt"
        if rc != 0 and dmesg.exists():
            tail = dmesg.read_text(errors="replace").splitlines()[-20:]
            print("vm: guest kernel log, last lines:\n" + "\n".join("  " + t for t in tail), flush=True)
        total = time.monotonic() - t_start
        what = "command" if args.cmd else "pytest"
        log(f"{what} exit status {rc}; boot {ready:.1f}s, VM {elapsed:.1f}s, total {total:.1f}s")
        return rc
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
