"""Crash safety: SIGKILL a process at many points of an operation, then reopen.

A forked child runs one store operation under a line tracer that counts the
lines executed in layerfs (and shutil, to land inside recursive deletes) and
kills itself with SIGKILL when the count reaches N.  A first run without a
kill measures how many lines the operation takes; then N walks across that
range.  After each kill the parent reopens the store and checks that it is
consistent (``check()`` finds nothing, no orphaned driver directory) and that
the operation either happened completely or not at all.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import layerfs
from tarbuild import simple_layer
from layerfs import _mountapi, digest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for overlay mounts")

_TRACED = (os.path.dirname(layerfs.__file__), os.path.dirname(shutil.__file__) + "/shutil.py")
POINTS_PER_OP = 150


BASE = simple_layer({"etc/passwd": b"root:x:0:0\n", "etc/group": b"root:x:0:\n", "bin/sh": b"#!" + b"x" * 5000})
TOP = simple_layer({"etc/motd": b"hello\n", "usr/share/doc/a": b"a" * 3000, "usr/share/doc/b": b"b"}, whiteouts=("etc/group",))


def _kill_at(limit: int):
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
            if count >= limit:
                os.kill(os.getpid(), signal.SIGKILL)
        return local

    def global_trace(frame, event, arg):
        if frame.f_code.co_filename.startswith(_TRACED):
            return local(frame, event, arg)
        return None

    return global_trace, lambda: count


def _run_child(root: Path, op, limit: int | None) -> int | None:
    """Run op(store) in a forked child; returns the line count when not killed, None when killed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            tracer, counted = _kill_at(limit if limit is not None else 1 << 60)
            store = layerfs.open_store(root)
            sys.settrace(tracer)
            op(store)
            sys.settrace(None)
            os.write(w, str(counted()).encode())
            store.close()
            code = 0
        except BaseException as exc:  # report, never raise into pytest's copy of itself
            try:
                os.write(w, f"ERR {type(exc).__name__}: {exc}".encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return None
    assert os.WEXITSTATUS(status) == 0, f"child failed: {out}"
    return int(out)


def _points(total: int) -> list[int]:
    if total <= POINTS_PER_OP:
        return list(range(1, total + 1))
    step = total / POINTS_PER_OP
    return sorted({max(1, int(i * step)) for i in range(POINTS_PER_OP)} | {total - 2, total - 1, total})


def _assert_consistent(root: Path) -> layerfs.LayerStore:
    store = layerfs.open_store(root)
    assert store.check() == []
    known = {l.cache_id for l in store.layers()} | {c.cache_id for c in store.containers()}
    assert store.driver.ids() == known, "driver directories the metadata does not know"
    return store


def _cleanup(root: Path) -> None:
    for point in _mountapi.mounts_under(str(root)):
        _mountapi.umount(point, _mountapi.MNT_DETACH)
    shutil.rmtree(root, ignore_errors=True)


def _prepare(root: Path, tmp: Path) -> dict:
    (tmp / "base.tar").write_bytes(BASE)
    (tmp / "top.tar").write_bytes(TOP)
    with layerfs.open_store(root) as store:
        base = store.register(tmp / "base.tar")
        store.create_container("victim", base.chain_id)
        path = store.mount("victim")
        (path / "etc" / "motd").write_text("changed\n")
        shutil.rmtree(path / "bin")
        store.unmount("victim")
        extra = store.register(io.BytesIO(simple_layer({"x": b"1"})), parent=base.chain_id)
    return {"base": base.chain_id, "extra": extra.chain_id, "top_tar": tmp / "top.tar"}


def _verify_register(store, ctx, done):
    chain = digest.chain_id(ctx["base"], digest.sha256_digest(TOP))
    ids = {l.chain_id for l in store.layers()}
    assert chain in ids or not done
    if chain in ids:
        store.create_container("probe", chain)
        path = store.mount("probe")
        assert (path / "etc" / "motd").read_bytes() == b"hello\n"
        assert not (path / "etc" / "group").exists()
        assert (path / "usr/share/doc/a").read_bytes() == b"a" * 3000
        store.unmount("probe")
        store.remove_container("probe")


def _verify_create(store, ctx, done):
    if done or any(c.name == "newbie" for c in store.containers()):
        store.mount("newbie")
        store.unmount("newbie")


def _verify_commit(store, ctx, done):
    committed = [l for l in store.layers() if l.parent == ctx["base"] and l.chain_id != ctx["extra"]]
    assert len(committed) == (1 if done else len(committed))
    for layer in committed:
        store.create_container("probe", layer.chain_id)
        path = store.mount("probe")
        assert (path / "etc/motd").read_text() == "changed\n"
        assert not (path / "bin").exists()
        store.unmount("probe")
        store.remove_container("probe")


def _verify_remove(store, ctx, done):
    names = [c.name for c in store.containers()]
    assert "victim" not in names or not done
    if "victim" in names:
        path = store.mount("victim")
        assert (path / "etc/motd").read_text() == "changed\n"
        store.unmount("victim")


def _verify_release(store, ctx, done):
    ids = {l.chain_id for l in store.layers()}
    assert ctx["extra"] not in ids or not done
    assert ctx["base"] in ids


def _verify_gc(store, ctx, done):
    assert {ctx["base"], ctx["extra"]} <= {l.chain_id for l in store.layers()}


CHAIN = [simple_layer({"a/1": b"1" * 100}), simple_layer({"b/2": b"2"}, whiteouts=("a/1",)), simple_layer({"c/3": b"3" * 5000})]


def _register_chain(ctx):
    def op(store):
        store.register_chain([(io.BytesIO(d), digest.sha256_digest(d)) for d in CHAIN], parent=ctx["base"])

    return op


def _verify_chain(store, ctx, done):
    top = digest.chain_id(ctx["base"], digest.sha256_digest(CHAIN[0]))
    for d in CHAIN[1:]:
        top = digest.chain_id(top, digest.sha256_digest(d))
    ids = {l.chain_id for l in store.layers()}
    assert top in ids or not done
    if top in ids:
        path = store.mount(top)
        assert sorted(p.name for p in path.iterdir()) == ["a", "b", "bin", "c", "etc"]
        assert not (path / "a/1").exists()
        store.unmount(top)


SCENARIOS = {
    "register": (lambda ctx: (lambda s: s.register(ctx["top_tar"], parent=ctx["base"])), _verify_register),
    "register_chain": (_register_chain, _verify_chain),
    "create_container": (lambda ctx: (lambda s: s.create_container("newbie", ctx["base"])), _verify_create),
    "commit": (lambda ctx: (lambda s: s.commit("victim")), _verify_commit),
    "remove_container": (lambda ctx: (lambda s: s.remove_container("victim")), _verify_remove),
    "release": (lambda ctx: (lambda s: s.release(ctx["extra"])), _verify_release),
    "gc": (lambda ctx: (lambda s: s.gc()), _verify_gc),
}


def _copy_store(src: Path, dst: Path) -> None:
    # cp -a keeps char 0:0 whiteouts and trusted.* xattrs, which copytree cannot.
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sigkill_anywhere_leaves_a_consistent_store(tmp_path: Path, scenario: str):
    make_op, verify = SCENARIOS[scenario]
    template = tmp_path / "template"
    ctx = _prepare(template, tmp_path)
    op = make_op(ctx)

    clean = tmp_path / "clean"
    _copy_store(template, clean)
    total = _run_child(clean, op, None)
    assert total and total > 10
    with _assert_consistent(clean) as store:
        verify(store, ctx, True)
    _cleanup(clean)

    killed = 0
    for point in _points(total):
        root = tmp_path / f"k{point}"
        _copy_store(template, root)
        try:
            if _run_child(root, op, point) is None:
                killed += 1
            with _assert_consistent(root) as store:
                verify(store, ctx, False)
        finally:
            _cleanup(root)
    print(f"{scenario}: {total} lines, killed at {killed} points")
    assert killed >= min(total, POINTS_PER_OP) // 2
