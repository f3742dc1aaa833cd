"""A realistic image, built once with debootstrap and cached: ``--image realistic``.

Three layers, as a Dockerfile would make them:

0. *minbase*: ``debootstrap --variant=minbase bookworm`` from the Debian mirror in
   the host's apt sources (``/dev``, ``/proc``, ``/sys`` left empty, apt lists and
   caches removed, as the Debian images on Docker Hub do);
1. *python3*: ``apt-get update && apt-get install --no-install-recommends python3
   && apt-get clean && rm -rf /var/lib/apt/lists/*`` in a chroot;
2. *delete*: a cleanup step: ``rm -rf`` of documentation, man pages, locales and a
   few Python modules (whiteouts for files of both lower layers and for whole
   directories), ``/etc/apt/apt.conf.d`` replaced wholesale (an opaque
   directory), and ``/etc/motd`` and ``/etc/debian_version``-like files rewritten.

Each step after the first runs in a chroot on a kernel overlay mount (lower = the
layers so far, a fresh upper); the upper directory is the layer, converted to an
OCI layer tar (char 0:0 whiteouts -> ``.wh.NAME``, ``trusted.overlay.opaque`` ->
``.wh..wh..opq``; overlay's own xattrs are dropped). The expected rootfs is the
walk of a read-only overlay of the three uppers. The image is then written like
the synthetic one (:func:`benchmarks.image.write_image`: an OCI layout with gzip
layers and a docker-archive; the pull suite pushes it into its local registry).

Built under ``CACHE/realistic-bookworm-v1/`` (``meta.json`` last; about 1-2 min
and ~40 MB of downloads, once). Needs root, ``debootstrap`` (apt) and the Debian
mirror the host's apt uses; without them :func:`cached` raises SkipBenchmark with
the reason. Unlike the synthetic image it is not byte-identical across machines
or months: the mirror's package versions go into ``meta.json`` and the results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

from . import image as bench_image
from . import mounts
from .runner import SkipBenchmark

VERSION = 1
SUITE = "bookworm"
NAMES = ("minbase", "python3", "delete")
PY_STEP = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
           "python3 >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*")
DELETE_STEP = ("rm -rf /usr/share/doc /usr/share/man /usr/share/info /usr/share/locale /usr/share/lintian "
               "/var/log/apt /var/log/dpkg.log /var/cache/debconf/templates.dat-old "
               "/usr/lib/python3.11/pydoc_data /usr/lib/python3.11/lib2to3 /usr/lib/python3.11/unittest "
               "/usr/lib/python3.11/email/architecture.rst /usr/bin/pydoc3.11 && "
               "rm -rf /etc/apt/apt.conf.d && mkdir /etc/apt/apt.conf.d && "
               "echo 'APT::Install-Recommends \"false\";' > /etc/apt/apt.conf.d/99norecommends && "
               "echo 'layerfs benchmark image' > /etc/motd && echo 'realistic' >> /etc/hostname")
OVERLAY_OPTS = "index=off,redirect_dir=off,metacopy=off"


def _log_nothing(msg: str) -> None:
    pass


def mirror() -> str | None:
    """The Debian mirror of the host's apt sources (deb822 or one-line), or None."""
    paths = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for p in paths:
        try:
            text = p.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if re.search(r"/debian/?$", m.group(1)):
                return m.group(1).rstrip("/")
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", text, re.M):
            if re.search(r"/debian/?$", m.group(1)):
                return m.group(1).rstrip("/")
    return None


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "building the realistic image needs root (debootstrap, chroot, overlay mounts)"
    if not shutil.which("debootstrap"):
        return "debootstrap not installed (apt-get install debootstrap)"
    if mirror() is None:
        return f"no Debian mirror for {SUITE} in /etc/apt/sources.list*"
    return None


def _run(cmd: list[str], what: str, timeout: float = 900) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SkipBenchmark(f"realistic image: {what} failed (exit {r.returncode}): "
                            f"{(r.stderr or r.stdout).strip()[-400:]}")


def _empty(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _step(lowers_top_first: list[Path], upper: Path, scratch: Path, script: str, what: str) -> None:
    """Run *script* in a chroot on an overlay of *lowers* with *upper* as the writable layer."""
    work, merged = scratch / "work", scratch / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={':'.join(map(str, lowers_top_first))},upperdir={upper},workdir={work},{OVERLAY_OPTS}"
    mounts.mount("overlay", merged, "overlay", opts)
    try:
        _run(["chroot", str(merged), "/bin/sh", "-c", script], what)
    finally:
        mounts.sweep(merged)
        if os.path.ismount(merged):
            mounts.umount(merged, detach=True)
    shutil.rmtree(work, ignore_errors=True)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque") == b"y"
    except OSError:
        return False


def layer_tar(src: Path, out, skip_contents=()) -> dict:
    """An OCI layer tar of directory *src* (an overlay upper or a plain rootfs); returns its manifest."""
    counts = {"dir": 0, "file": 0, "symlink": 0, "hardlink": 0, "whiteout": 0, "other": 0}
    nbytes = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, src)
            if rel_dir in skip_contents:
                dirnames[:] = []
                filenames = []
            if rel_dir != "." and _opaque(Path(dirpath)):
                ti = tarfile.TarInfo(f"{rel_dir}/.wh..wh..opq")
                ti.mtime, ti.mode = int(os.lstat(dirpath).st_mtime), 0o644
                tf.addfile(ti)
                counts["whiteout"] += 1
            for name in sorted(dirnames + filenames):
                p = os.path.join(dirpath, name)
                rel = os.path.normpath(os.path.join(rel_dir, name))
                st = os.lstat(p)
                if _is_whiteout(st):
                    parent, _, base = rel.rpartition("/")
                    ti = tarfile.TarInfo(f"{parent}/.wh.{base}" if parent else f".wh.{base}")
                    ti.mtime, ti.mode = int(st.st_mtime), 0o644
                    tf.addfile(ti)
                    counts["whiteout"] += 1
                    continue
                ti = tf.gettarinfo(p, arcname=rel)
                ti.uname = ti.gname = ""
                if ti.isreg():
                    with open(p, "rb") as f:
                        tf.addfile(ti, f)
                    counts["file"] += 1
                    nbytes += ti.size
                else:
                    tf.addfile(ti)
                    kind = ("dir" if ti.isdir() else "symlink" if ti.issym() else
                            "hardlink" if ti.islnk() else "other")
                    counts[kind] += 1
    return {"entries": counts, "file_bytes": nbytes}


def _packages(root: Path) -> dict[str, str]:
    r = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}\n"],
                       capture_output=True, text=True)
    return dict(l.split(" ", 1) for l in r.stdout.splitlines() if " " in l)


def _build(out: Path, log) -> dict:
    url = mirror()
    rootfs, up1, up2 = out / "build" / "rootfs", out / "build" / "python3", out / "build" / "delete"
    t0 = time.monotonic()
    log(f"[realistic] debootstrap --variant=minbase {SUITE} from {url} (once; cached)")
    _run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), url], "debootstrap", timeout=1800)
    for d in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for p in (rootfs / d).glob("*"):
            if p.is_file():
                p.unlink()
    for p in (rootfs / "var/cache/apt").glob("*.bin"):
        p.unlink()
    log(f"[realistic] minbase ready ({time.monotonic() - t0:.0f} s); installing python3 in a layer")
    _step([rootfs], up1, out / "build" / "s1", PY_STEP, "apt-get install python3")
    log(f"[realistic] python3 layer ready ({time.monotonic() - t0:.0f} s); cleanup layer")
    _step([up1, rootfs], up2, out / "build" / "s2", DELETE_STEP, "the cleanup step")

    (out / "layers").mkdir()
    layers = []
    for i, (name, src) in enumerate(zip(NAMES, (rootfs, up1, up2))):
        with open(out / "layers" / f"{i}.tar", "wb") as f:
            w = bench_image._Hashing(f)
            manifest = layer_tar(src, w, skip_contents=("dev", "proc", "sys") if i == 0 else ())
        layers.append({"name": name, "diff_id": "sha256:" + w.h.hexdigest(), "tar_bytes": w.n,
                       "entries": manifest["entries"], "file_bytes": manifest["file_bytes"]})
    meta = bench_image.write_image(out, layers)

    # the expected rootfs: a read-only overlay of the three layers (empty dev/proc/sys, as in the tar)
    from .suites.pull import _walk
    flat = out / "build" / "flat"
    flat.mkdir()
    mounts.mount("overlay", flat, "overlay", f"lowerdir={up2}:{up1}:{rootfs},{OVERLAY_OPTS}")
    try:
        tree = _walk(flat)
        pk = _packages(flat)
    finally:
        mounts.umount(flat)
    for d in ("dev", "proc", "sys"):
        for p in [p for p in tree if p.startswith(d + "/")]:
            del tree[p]
    (out / "expected.json").write_text(json.dumps(tree, separators=(",", ":")))
    python = pk.get("python3", "?")
    desc = (f"3 layers (debootstrap --variant=minbase {SUITE} {layers[0]['tar_bytes'] / 1e6:.0f} MB, "
            f"python3 {python} {layers[1]['tar_bytes'] / 1e6:.0f} MB, cleanup layer with "
            f"{layers[2]['entries']['whiteout']} whiteouts), {len(tree):,}-entry rootfs")
    return {"image_version": f"realistic-{VERSION}", "key": f"realistic-{SUITE}-v{VERSION}", "description": desc,
            "kind": "realistic", "mirror": url, "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_s": round(time.monotonic() - t0, 1), "packages": pk, **meta,
            "rootfs_entries": len(tree), "rootfs_file_bytes": sum(v[4] for v in tree.values() if v[0] == "f")}


def cached(cache_dir: Path, log=_log_nothing) -> bench_image.BuiltImage:
    """The realistic image under *cache_dir*, built on first use (SkipBenchmark when it cannot be)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"realistic-{SUITE}-v{VERSION}"
    if (final / "meta.json").is_file():
        return bench_image.BuiltImage(final, json.loads((final / "meta.json").read_text()))
    why = unavailable()
    if why:
        raise SkipBenchmark(f"realistic image cannot be built here: {why}")
    for d in cache_dir.glob(f".realistic-{SUITE}-v{VERSION}.tmp*"):
        pid = d.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            mounts.safe_rmtree(d)
    tmp = cache_dir / f".realistic-{SUITE}-v{VERSION}.tmp{os.getpid()}"
    try:
        tmp.mkdir()
        meta = _build(tmp, log)
        mounts.safe_rmtree(tmp / "build")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            mounts.safe_rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            mounts.safe_rmtree(tmp)
    return bench_image.BuiltImage(final, meta)
