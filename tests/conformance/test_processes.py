"""Several processes on one root: an engine and the CLI share a store.  Mount
reference counts survive a process exit.  A process killed (SIGKILL) in the
middle of register, create_container, commit, remove_container, release or
gc leaves a store that opens cleanly, with finished work all there and
unfinished work gone, and check() finds nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import layerfs
from layerfs import errors

from conformance import chain_ids_of, container_names, copies_of, files_containing, mounted, register_bytes
from conftest import mounts_under
from tarbuild import LayerTar

# A child process: opens the store, says "go", then runs one operation.
CHILD = r"""
import sys, layerfs
root, driver, op, arg = sys.argv[1:5]
store = layerfs.open_store(root, driver=driver)
print("go", flush=True)
if op == "register":
    layer = store.register(arg, parent=sys.argv[5] if len(sys.argv) > 5 else None)
    print(layer.chain_id, flush=True)
elif op == "mount":
    print(store.mount(arg), flush=True)
elif op == "create":
    store.create_container(arg, sys.argv[5] if len(sys.argv) > 5 else None)
elif op == "commit":
    print(store.commit(arg).chain_id, flush=True)
elif op == "remove":
    store.remove_container(arg)
elif op == "release":
    store.release(arg)
elif op == "gc":
    store.gc()
elif op == "sleep":
    import time; time.sleep(60)
else:
    raise SystemExit("unknown op " + op)
store.close()
print("done", flush=True)
"""


def _child(root, driver, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), driver, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run_child(root, driver, *args) -> list[str]:
    p = _child(root, driver, *args)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    return out.decode().split()


# ---------------------------------------------------------------------------
# sharing a root


def test_other_process_sees_registered_layer(store, store_root, driver_name, work_dir):
    base = register_bytes(store, LayerTar().file("base", b"b").bytes())
    tar = work_dir / "child.tar"
    tar.write_bytes(LayerTar().file("child", b"c").bytes())
    out = _run_child(store_root, driver_name, "register", tar, base.chain_id)
    child_id = out[1]
    # visible in this (still open) store without reopening
    assert chain_ids_of(store.layers()) == {base.chain_id, child_id}
    assert store.layer(child_id).parent == base.chain_id
    with mounted(store, child_id) as mp:
        assert (mp / "child").read_bytes() == b"c" and (mp / "base").exists()


def test_other_process_sees_container_and_name_conflict(store, store_root, driver_name):
    _run_child(store_root, driver_name, "create", "from-child")
    assert container_names(store) == {"from-child"}
    with pytest.raises(errors.AlreadyExists):
        store.create_container("from-child", None)


def test_mount_refcount_survives_process_exit(store, store_root, driver_name):
    store.create_container("c", None)
    out = _run_child(store_root, driver_name, "mount", "c")
    path = out[1]
    assert os.path.ismount(path), "the mount did not outlive the process that made it"
    with pytest.raises(errors.InUse):
        store.remove_container("c")
    # this process takes a second reference and drops both
    assert str(store.mount("c")) == path
    store.unmount("c")
    assert os.path.ismount(path)
    store.unmount("c")
    assert not os.path.ismount(path)
    store.remove_container("c")
    assert mounts_under(store_root) == []


def test_concurrent_register_of_same_content(store, store_root, driver_name, work_dir):
    marker = b"concurrent-marker-" + os.urandom(6).hex().encode()
    tar = work_dir / "same.tar"
    tar.write_bytes(_big_layer(marker, files=50))
    procs = [_child(store_root, driver_name, "register", tar) for _ in range(4)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        outs.append(out.decode().split()[1])
    assert len(set(outs)) == 1
    (cid,) = set(outs)
    assert chain_ids_of(store.layers()) == {cid}
    # one copy on disk, four references
    assert copies_of(store_root, marker) == 50
    for _ in range(3):
        store.release(cid)
        assert store.layer(cid)
    store.release(cid)
    with pytest.raises(errors.NotFound):
        store.layer(cid)


def test_concurrent_create_of_same_name(store, store_root, driver_name):
    procs = [_child(store_root, driver_name, "create", "contended") for _ in range(4)]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        results.append((p.returncode, err.decode()))
    ok = [r for r in results if r[0] == 0]
    assert len(ok) == 1, results
    for rc, err in results:
        if rc != 0:
            assert "AlreadyExists" in err, err
    assert container_names(store) == {"contended"}
    assert store.check() == []


# ---------------------------------------------------------------------------
# SIGKILL at many points

# Delays after the child said "go" (it then starts the operation at once).
KILL_DELAYS = (0.0, 0.005, 0.02, 0.06, 0.12, 0.2)


def _kill_during(root, driver, delay, *args):
    p = _child(root, driver, *args)
    watchdog = threading.Timer(120, p.kill)  # never hang the suite on a stuck child
    watchdog.start()
    try:
        line = p.stdout.readline()
    finally:
        watchdog.cancel()
    if line.strip() != b"go":
        p.kill()
        _, err = p.communicate()
        pytest.fail(f"child failed to start: {err.decode()}")
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    out, _ = p.communicate()
    return p.returncode, out.decode().split()


def _big_layer(marker: bytes, files=400, size=16 << 10) -> bytes:
    t = LayerTar().dir("data")
    for i in range(files):
        t.file(f"data/f{i:04d}", marker + (b"%06d" % i) * (size // 6))
    return t.bytes()


def _verify_big(mp, marker, files=400, size=16 << 10):
    names = sorted(os.listdir(mp / "data"))
    assert len(names) == files
    for i in (0, files // 2, files - 1):
        assert (mp / f"data/f{i:04d}").read_bytes() == marker + (b"%06d" % i) * (size // 6)


def _reopen(root, driver):
    # must open cleanly whatever instant the previous process died at
    s = layerfs.open_store(root, driver=driver)
    problems = s.check()
    assert problems == [], f"store not clean after a kill: {problems}"
    return s


@pytest.mark.slow
def test_kill_during_register(store, store_root, driver_name, work_dir):
    base = register_bytes(store, LayerTar().file("base", b"b").bytes())
    store.close()
    marker = b"crash-register-" + os.urandom(6).hex().encode()
    tar = work_dir / "big.tar"
    tar.write_bytes(_big_layer(marker))
    for delay in KILL_DELAYS:
        _kill_during(store_root, driver_name, delay, "register", tar, base.chain_id)
        with _reopen(store_root, driver_name) as s:
            ids = chain_ids_of(s.layers())
            assert base.chain_id in ids, f"delay {delay}: the base layer vanished: {ids}"
            new = ids - {base.chain_id}
            assert len(new) <= 1, f"delay {delay}: {new}"
            if new:
                (cid,) = new
                assert s.layer(cid).parent == base.chain_id
                with mounted(s, cid) as mp:
                    _verify_big(mp, marker)
                s.release(cid)
            s.gc()
            assert files_containing(store_root, marker) == [], \
                f"delay {delay}: an unfinished or released layer left files behind"
            assert mounts_under(store_root) == []


@pytest.mark.slow
def test_kill_during_commit(store, store_root, driver_name):
    marker = b"crash-commit-" + os.urandom(6).hex().encode()
    base = register_bytes(store, LayerTar().file("base", b"b").bytes())
    store.create_container("c", base.chain_id)
    with mounted(store, "c") as mp:
        (mp / "data").mkdir()
        for i in range(400):
            (mp / f"data/f{i:04d}").write_bytes(marker + (b"%06d" % i) * ((16 << 10) // 6))
    store.close()
    baseline = copies_of(store_root, marker)  # the container's own copies
    for delay in KILL_DELAYS:
        _kill_during(store_root, driver_name, delay, "commit", "c")
        with _reopen(store_root, driver_name) as s:
            assert container_names(s) == {"c"}, f"delay {delay}"
            assert base.chain_id in chain_ids_of(s.layers()), f"delay {delay}: base vanished"
            ids = chain_ids_of(s.layers()) - {base.chain_id}
            assert len(ids) <= 1, f"delay {delay}: {ids}"
            if ids:
                (cid,) = ids
                assert s.layer(cid).parent == base.chain_id
                with mounted(s, cid) as mp:
                    _verify_big(mp, marker)
                s.release(cid)
            with mounted(s, "c") as mp:
                _verify_big(mp, marker)
            s.gc()
            assert copies_of(store_root, marker) == baseline, \
                f"delay {delay}: an unfinished or released commit left files behind"
            assert s.check() == []


@pytest.mark.slow
def test_kill_during_remove_container(store, store_root, driver_name):
    base = register_bytes(store, LayerTar().file("base", b"b").bytes())
    store.close()
    for delay in KILL_DELAYS:
        marker = b"crash-remove-" + os.urandom(6).hex().encode()
        with layerfs.open_store(store_root, driver=driver_name) as s:
            s.create_container("victim", base.chain_id)
            with mounted(s, "victim") as mp:
                (mp / "data").mkdir()
                for i in range(400):
                    (mp / f"data/f{i:04d}").write_bytes(marker + (b"%06d" % i) * ((16 << 10) // 6))
        _kill_during(store_root, driver_name, delay, "remove", "victim")
        with _reopen(store_root, driver_name) as s:
            if "victim" in container_names(s):
                with mounted(s, "victim") as mp:
                    _verify_big(mp, marker)
                s.remove_container("victim")
            s.gc()
            assert files_containing(store_root, marker) == [], f"delay {delay}"
            assert chain_ids_of(s.layers()) == {base.chain_id}, f"delay {delay}"


@pytest.mark.slow
def test_kill_during_create_container(store, store_root, driver_name):
    base = register_bytes(store, LayerTar().file("base", b"b").bytes())
    store.close()
    for i, delay in enumerate(KILL_DELAYS):
        name = f"new-{i}"
        _kill_during(store_root, driver_name, delay, "create", name, base.chain_id)
        with _reopen(store_root, driver_name) as s:
            names = container_names(s)
            assert names <= {name}, f"delay {delay}: {names}"
            assert chain_ids_of(s.layers()) == {base.chain_id}, f"delay {delay}"
            if names:
                assert s.container(name).parent == base.chain_id
                with mounted(s, name) as mp:
                    assert (mp / "base").read_bytes() == b"b"
                    (mp / "w").write_bytes(b"w")
                s.remove_container(name)
            s.gc()
            assert s.check() == []


@pytest.mark.slow
def test_kill_during_release_and_gc(store, store_root, driver_name, work_dir):
    store.close()
    for delay in KILL_DELAYS:
        marker = b"crash-release-" + os.urandom(6).hex().encode()
        with layerfs.open_store(store_root, driver=driver_name) as s:
            layer = register_bytes(s, _big_layer(marker))
        _kill_during(store_root, driver_name, delay, "release", layer.chain_id)
        with _reopen(store_root, driver_name) as s:
            if layer.chain_id in chain_ids_of(s.layers()):
                with mounted(s, layer.chain_id) as mp:
                    _verify_big(mp, marker)
                s.release(layer.chain_id)
        _kill_during(store_root, driver_name, delay, "gc", "-")
        with _reopen(store_root, driver_name) as s:
            assert s.layers() == []
            s.gc()
            assert files_containing(store_root, marker) == []
