"""register: apply a synthetic layer tar into a fresh store, against GNU tar -x.

Inputs: one deterministic 200 MB / 20,000-file layer tar (cached under the out
dir) and its gzip and zstd encodings. Each iteration of the layerfs side opens a
fresh store (untimed), times ``store.register(path)``, checks the diff_id, then
closes and removes the store (untimed). The reference extracts the same file with
GNU tar into a fresh plain directory on the same filesystem. Both sides: the
input is warm in page cache, no sync inside the timed region, and an untimed
``sync`` after each iteration's cleanup so nobody pays for the previous
iteration's writeback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .. import synth
from ..machine import _first_line as _tool_version
from ..runner import Benchmark, Contender, Target, stopwatch

FULL = synth.TreeSpec(files=20_000, total_bytes=200_000_000, symlinks=200, hardlinks=50)
QUICK = synth.TreeSpec(files=1_000, total_bytes=10_000_000, symlinks=20, hardlinks=5)

CACHE_NOTE = ("input tar kept warm in page cache for both sides (read through before the "
              "benchmark and between rounds); no fs sync in the timed region of either side; "
              "untimed `sync` after each iteration's cleanup on both sides")


def _register_contender(ctx, path: Path, expected_diff_id: str) -> Contender:
    def once() -> float:
        root = ctx.scratch("store")
        try:
            store = ctx.open_store(root)
            try:
                with stopwatch() as t:
                    layer = store.register(str(path))
                if layer.diff_id != expected_diff_id:
                    raise AssertionError(f"register gave diff_id {layer.diff_id}, expected {expected_diff_id}")
            finally:
                store.close()
        finally:
            ctx.remove(root)
            os.sync()
        return t.elapsed
    return Contender("layerfs register", once, role="layerfs",
                     info={"call": f"store.register({path.name!r})", "driver": ctx.driver})


def _tar_commands(path: Path, kind: str) -> tuple[str, callable]:
    """Label and a function(dest) running the reference extraction."""
    if kind == "tar":
        return "tar -xf", lambda d: subprocess.run(["tar", "-xf", str(path), "-C", str(d)], check=True)
    if kind == "gz":
        return "tar -xzf", lambda d: subprocess.run(["tar", "-xzf", str(path), "-C", str(d)], check=True)
    if shutil.which("zstd"):
        label, dec = "zstd -dc | tar -x", ["zstd", "-dcq", str(path)]
    else:
        label = "python zstandard | tar -x"
        dec = [sys.executable, "-c",
               "import sys, zstandard; zstandard.ZstdDecompressor().copy_stream("
               "open(sys.argv[1], 'rb'), sys.stdout.buffer)", str(path)]

    def pipe(d: Path) -> None:
        p1 = subprocess.Popen(dec, stdout=subprocess.PIPE)
        p2 = subprocess.Popen(["tar", "-x", "-C", str(d)], stdin=p1.stdout)
        p1.stdout.close()
        r2, r1 = p2.wait(), p1.wait()
        if r1 or r2:
            raise subprocess.CalledProcessError(r1 or r2, label)
    return label, pipe


def _tar_contender(ctx, path: Path, kind: str) -> Contender:
    label, extract = _tar_commands(path, kind)

    def once() -> float:
        dest = ctx.scratch("tar")
        try:
            with stopwatch() as t:
                extract(dest)
        finally:
            ctx.remove(dest)
            os.sync()
        return t.elapsed
    info = {"command": label, "tar": _tool_version(["tar", "--version"])}
    if kind == "gz":
        info["gzip"] = _tool_version(["gzip", "--version"])
    if kind == "zst":
        info["zstd"] = _tool_version(["zstd", "-V"]) if shutil.which("zstd") else "python zstandard"
    return Contender(label, once, role="reference", info=info)


def _tree(root: Path) -> dict[str, tuple]:
    """path -> (type, size, mode, uid, gid, mtime or None, link target or content digest)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                extra, mtime = h.hexdigest(), st.st_mtime_ns
            elif stat.S_ISLNK(st.st_mode):
                extra, mtime = os.readlink(p), st.st_mtime_ns
            else:
                extra, mtime = None, None
            out[rel] = (stat.S_IFMT(st.st_mode), st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                        stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime, extra)
    return out


def verify(ctx, path: Path) -> list[str]:
    """Register once and compare the mounted layer with `tar -xf` of the same tar.

    Raises if content differs (a fast wrong answer is no answer); returns notes for
    metadata differences.
    """
    ref = ctx.scratch("verify-tar")
    root = ctx.scratch("verify-store")
    try:
        subprocess.run(["tar", "-xf", str(path), "-C", str(ref)], check=True)
        with ctx.open_store(root) as store:
            layer = store.register(str(path))
            mnt = store.mount(layer.chain_id)
            try:
                got = _tree(Path(mnt))
            finally:
                store.unmount(layer.chain_id)
        want = _tree(ref)
    finally:
        ctx.remove(ref)
        ctx.remove(root)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    content = [p for p in sorted(set(want) & set(got))
               if (want[p][0], want[p][1], want[p][6]) != (got[p][0], got[p][1], got[p][6])]
    if missing or extra or content:
        raise AssertionError(
            f"registered layer differs from `tar -xf`: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} extra (e.g. {extra[:3]}), {len(content)} with other type/size/content "
            f"(e.g. {content[:3]})")
    meta = [p for p in want if want[p][2:6] != got[p][2:6]]
    if meta:
        return [f"verification: content identical to `tar -xf`, but {len(meta)} entries differ in "
                f"mode/owner/mtime (e.g. {meta[0]}: tar {want[meta[0]][2:6]} vs layerfs {got[meta[0]][2:6]})"]
    return [f"verification: mounted layer identical to `tar -xf` output ({len(want):,} entries: "
            "type, size, content, mode, owner, mtime)"]


def suite(ctx):
    ctx.layerfs()  # skip early, before generating inputs, when the library is missing
    spec = ctx.pick(FULL, QUICK)
    tar, manifest = synth.cached_tar(spec, ctx.cache_dir)
    verify_notes = verify(ctx, tar)
    workload = {"spec": manifest["spec"], "entries": manifest["entries"],
                "file_bytes": manifest["file_bytes"], "tar_bytes": manifest["tar_bytes"],
                "diff_id": manifest["diff_id"], "description": synth.lognormal_note(spec)}
    for kind in ("tar", "gz", "zst"):
        path = tar if kind == "tar" else synth.compressed(tar, kind)
        synth.read_through(path)
        suffix = {"tar": "tar", "gz": "tar.gz", "zst": "tar.zst"}[kind]
        yield Benchmark(
            name=f"register.{suffix}",
            description=f"register a {spec.total_bytes / 1e6:.0f} MB / {spec.files:,}-file layer "
                        f"(.{suffix}) into a fresh store",
            contenders=[_register_contender(ctx, path, manifest["diff_id"]),
                        _tar_contender(ctx, path, kind)],
            subject="layerfs register",
            reference=_tar_commands(path, kind)[0],
            target=Target.ratio(1.3) if kind == "tar" else None,
            runs=7 if kind == "tar" else 5,
            workload={**workload, "input": path.name, "input_bytes": path.stat().st_size},
            notes=[CACHE_NOTE] + (verify_notes if kind == "tar" else
                                  ["reported only, no target"]),
            between_rounds=lambda p=path: synth.read_through(p),
        )
