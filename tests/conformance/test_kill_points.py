"""Crash safety, deterministically: SIGKILL before every filesystem syscall.

A child process runs one operation (create_container, register, commit,
remove_container, release).  A dry run under strace lists the filesystem
syscalls the operation makes; then, for each of them, the operation runs again
with strace injecting SIGKILL on entry to exactly that syscall (the kernel
never executes it).  After every kill the store must open cleanly, check()
must find nothing, finished work must be complete and unfinished work gone.

Killing before syscall N is the same as killing right after syscall N-1, so
this visits every on-disk state the operation passes through.  SQLite's own
writes are sampled (its atomicity is SQLite's business); every other
mutating syscall is a kill point.  Needs strace (apt-get install strace).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import layerfs

from conformance import chain_ids_of, container_names, files_containing, mounted, register_bytes
from tarbuild import LayerTar

STRACE = shutil.which("strace")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(STRACE is None, reason="needs strace (apt-get install strace)"),
]

FS_CALLS = (
    "openat", "open", "creat", "write", "pwrite64", "writev", "mkdir", "mkdirat", "rename", "renameat",
    "renameat2", "symlink", "symlinkat", "unlink", "unlinkat", "rmdir", "link", "linkat", "chmod",
    "fchmod", "fchmodat", "chown", "fchown", "fchownat", "lchown", "setxattr", "lsetxattr",
    "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "mknod", "mknodat", "utimensat",
    "ftruncate", "truncate", "fsync", "fdatasync", "copy_file_range", "sendfile", "fallocate",
)
SQLITE_CALLS = {"pwrite64", "fdatasync", "fsync", "ftruncate"}
SQLITE_SAMPLE = 6     # every 6th SQLite write/sync is a kill point as well
DM_KILL_POINTS = 12   # devicemapper (in the VM): an even sample of this many kill points per operation

CHILD = r"""
import sys, layerfs
root, driver, op, arg = sys.argv[1:5]
extra = sys.argv[5] if len(sys.argv) > 5 else None
store = layerfs.open_store(root, driver=driver)
sys.stdout.write("go\n"); sys.stdout.flush()
if op == "create":
    store.create_container(arg, extra)
elif op == "register":
    store.register(arg, parent=extra)
elif op == "commit":
    store.commit(arg)
elif op == "remove":
    store.remove_container(arg)
elif op == "release":
    store.release(arg)
store.close()
"""

_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)$")


def _kill_points(trace: str) -> list[tuple[str, int, str]]:
    """(syscall, invocation number, description) for each kill point after "go"."""
    counts: dict[tuple[str, str], int] = {}
    points = []
    seen_go = False
    main_pid = None
    sqlite_seen = 0
    for line in trace.splitlines():
        m = _LINE.match(line)
        if not m or "resumed>" in line:
            continue
        pid, call, args = m.groups()
        main_pid = main_pid or pid
        counts[(pid, call)] = counts.get((pid, call), 0) + 1
        if call == "write" and args.startswith('1, "go'):
            seen_go = True
            continue
        if not seen_go or pid != main_pid:
            continue
        if call in ("openat", "open") and not re.search(r"O_CREAT|O_TRUNC|O_WRONLY|O_RDWR", args):
            continue
        if call == "write" and args.startswith(("1,", "2,")):
            continue
        if call in SQLITE_CALLS:
            sqlite_seen += 1
            if sqlite_seen % SQLITE_SAMPLE:
                continue
        points.append((call, counts[(pid, call)], f"{call}({args[:120]}"))
    return points


def _child_cmd(root, driver, *args):
    return [sys.executable, "-c", CHILD, str(root), driver, *map(str, args)]


def _dry_run(tmp, root, driver, *args) -> list[tuple[str, int, str]]:
    trace = Path(tmp) / "trace.txt"
    r = subprocess.run([STRACE, "-f", "-qq", "-o", str(trace), "-e", "trace=" + ",".join(FS_CALLS),
                        *_child_cmd(root, driver, *args)], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    points = _kill_points(trace.read_text(errors="replace"))
    assert points, "the dry run saw no filesystem syscalls after 'go'"
    if driver == "devicemapper" and len(points) > DM_KILL_POINTS:
        # Under the VM's TCG emulation each kill point costs a traced child and a
        # reopen (~4 s), and a devicemapper operation has 40-100 of them: take an
        # even sample, always with the first and the last.
        step = (len(points) - 1) / (DM_KILL_POINTS - 1)
        points = [points[round(i * step)] for i in range(DM_KILL_POINTS)]
    return points


def _kill_at(root, driver, call, nth, *args) -> int:
    r = subprocess.run([STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={call}",
                        "-e", f"inject={call}:signal=KILL:when={nth}",
                        *_child_cmd(root, driver, *args)], capture_output=True, timeout=120)
    return r.returncode


def _reopen(root, driver, where):
    try:
        s = layerfs.open_store(root, driver=driver)
    except Exception as e:  # noqa: BLE001 - any failure to open is the finding
        raise AssertionError(f"killed before {where}: the store no longer opens: {e!r}") from e
    problems = s.check()
    assert problems == [], f"killed before {where}: check() reports {problems}"
    return s


def _payload(marker: bytes) -> bytes:
    return (LayerTar()
            .dir("data")
            .file("data/a", marker + b"-a", mode=0o640, uid=1, gid=2)
            .file("data/b", marker + b"-b" * 1000)
            .hardlink("data/c", "data/a")
            .symlink("data/l", "a")
            .whiteout("gone")
            .bytes())


def _verify_payload(mp: Path, marker: bytes):
    assert (mp / "data/a").read_bytes() == marker + b"-a"
    assert (mp / "data/b").read_bytes() == marker + b"-b" * 1000
    assert os.readlink(mp / "data/l") == "a"
    assert os.lstat(mp / "data/a").st_ino == os.lstat(mp / "data/c").st_ino
    assert not (mp / "gone").exists()


@pytest.fixture
def base(store, store_root):
    layer = register_bytes(store, LayerTar().file("gone", b"g").file("base", b"b").bytes())
    store.close()
    return layer


def test_kill_points_create_container(store_root, driver_name, base, tmp_path):
    points = _dry_run(tmp_path, store_root, driver_name, "create", "dry", base.chain_id)
    with _reopen(store_root, driver_name, "nothing") as s:
        s.remove_container("dry")
        s.gc()
    for i, (call, nth, where) in enumerate(points):
        name = f"c{i:04d}"
        _kill_at(store_root, driver_name, call, nth, "create", name, base.chain_id)
        with _reopen(store_root, driver_name, where) as s:
            names = container_names(s)
            assert names <= {name}, f"killed before {where}: {names}"
            assert chain_ids_of(s.layers()) == {base.chain_id}, f"killed before {where}"
            if names:
                assert s.container(name).parent == base.chain_id
                with mounted(s, name) as mp:
                    assert (mp / "base").read_bytes() == b"b"
                    (mp / "w").write_bytes(b"w")
                s.remove_container(name)
            s.gc()
            assert s.check() == [], f"killed before {where}"


def test_kill_points_register(store_root, driver_name, base, tmp_path):
    marker = b"kp-register-" + os.urandom(6).hex().encode()
    tar = tmp_path / "layer.tar"
    tar.write_bytes(_payload(marker))
    points = _dry_run(tmp_path, store_root, driver_name, "register", tar, base.chain_id)
    with _reopen(store_root, driver_name, "nothing") as s:
        for cid in chain_ids_of(s.layers()) - {base.chain_id}:
            s.release(cid)
        s.gc()
    for call, nth, where in points:
        _kill_at(store_root, driver_name, call, nth, "register", tar, base.chain_id)
        with _reopen(store_root, driver_name, where) as s:
            ids = chain_ids_of(s.layers())
            assert base.chain_id in ids, f"killed before {where}: the parent vanished"
            new = ids - {base.chain_id}
            assert len(new) <= 1, f"killed before {where}: {new}"
            for cid in new:
                assert s.layer(cid).parent == base.chain_id
                with mounted(s, cid) as mp:
                    _verify_payload(mp, marker)
                s.release(cid)
            s.gc()
            assert files_containing(store_root, marker) == [], \
                f"killed before {where}: an unfinished layer left files behind"


def test_kill_points_commit(store_root, driver_name, base, tmp_path):
    marker = b"kp-commit-" + os.urandom(6).hex().encode()
    with _reopen(store_root, driver_name, "setup") as s:
        s.create_container("c", base.chain_id)
        with mounted(s, "c") as mp:
            (mp / "data").mkdir()
            (mp / "data/a").write_bytes(marker + b"-a")
            os.chown(mp / "data/a", 1, 2)
            os.chmod(mp / "data/a", 0o640)
            (mp / "data/b").write_bytes(marker + b"-b" * 1000)
            os.link(mp / "data/a", mp / "data/c")
            os.symlink("a", mp / "data/l")
            os.unlink(mp / "gone")
    baseline = len(files_containing(store_root, marker))
    points = _dry_run(tmp_path, store_root, driver_name, "commit", "c")
    with _reopen(store_root, driver_name, "nothing") as s:
        for cid in chain_ids_of(s.layers()) - {base.chain_id}:
            s.release(cid)
        s.gc()
    for call, nth, where in points:
        _kill_at(store_root, driver_name, call, nth, "commit", "c")
        with _reopen(store_root, driver_name, where) as s:
            assert container_names(s) == {"c"}, f"killed before {where}"
            ids = chain_ids_of(s.layers())
            assert base.chain_id in ids, f"killed before {where}: the parent vanished"
            new = ids - {base.chain_id}
            assert len(new) <= 1, f"killed before {where}: {new}"
            for cid in new:
                assert s.layer(cid).parent == base.chain_id
                with mounted(s, cid) as mp:
                    _verify_payload(mp, marker)
                s.release(cid)
            with mounted(s, "c") as mp:
                _verify_payload(mp, marker)
            s.gc()
            assert len(files_containing(store_root, marker)) == baseline, \
                f"killed before {where}: an unfinished commit left files behind"


def test_kill_points_remove_container(store_root, driver_name, base, tmp_path):
    def make(s, marker):
        s.create_container("victim", base.chain_id)
        with mounted(s, "victim") as mp:
            (mp / "f").write_bytes(marker)

    with _reopen(store_root, driver_name, "setup") as s:
        make(s, b"dry-run")
    points = _dry_run(tmp_path, store_root, driver_name, "remove", "victim")
    for i, (call, nth, where) in enumerate(points):
        marker = b"kp-remove-%04d-" % i + os.urandom(4).hex().encode()
        with _reopen(store_root, driver_name, "setup") as s:
            s.gc()
            make(s, marker)
        _kill_at(store_root, driver_name, call, nth, "remove", "victim")
        with _reopen(store_root, driver_name, where) as s:
            if "victim" in container_names(s):
                with mounted(s, "victim") as mp:
                    assert (mp / "f").read_bytes() == marker, f"killed before {where}"
                s.remove_container("victim")
            s.gc()
            assert files_containing(store_root, marker) == [], f"killed before {where}"
            assert chain_ids_of(s.layers()) == {base.chain_id}, f"killed before {where}"


def test_kill_points_release(store_root, driver_name, base, tmp_path):
    def make(s, marker):
        return register_bytes(s, _payload(marker), parent=base.chain_id)

    with _reopen(store_root, driver_name, "setup") as s:
        dry = make(s, b"dry-run")
    points = _dry_run(tmp_path, store_root, driver_name, "release", dry.chain_id)
    for i, (call, nth, where) in enumerate(points):
        marker = b"kp-release-%04d-" % i + os.urandom(4).hex().encode()
        with _reopen(store_root, driver_name, "setup") as s:
            s.gc()
            layer = make(s, marker)
        _kill_at(store_root, driver_name, call, nth, "release", layer.chain_id)
        with _reopen(store_root, driver_name, where) as s:
            if layer.chain_id in chain_ids_of(s.layers()):
                with mounted(s, layer.chain_id) as mp:
                    _verify_payload(mp, marker)
                s.release(layer.chain_id)
            s.gc()
            assert files_containing(store_root, marker) == [], f"killed before {where}"
            assert chain_ids_of(s.layers()) == {base.chain_id}, f"killed before {where}"
