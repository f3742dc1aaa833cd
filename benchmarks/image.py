"""A deterministic three-layer image for the pull suite, built once and cached.

Layers (all generated with :mod:`benchmarks.synth`, so the same spec always
gives the same layer tars and diff ids):

0. *base*: a Debian-like root filesystem -- many small and medium files under
   bin/ etc/ lib/ usr/ var/ ..., log-normal sizes, symlinks and hardlinks,
   a few setuid files and files owned by uid 1000;
1. *app*: an "application" layer (~50 MB in many files) beside the base;
2. *delete*: whiteouts as an ``apt-get purge``/cleanup step writes them --
   single files of both lower layers (``.wh.NAME``), whole directories of the
   base (``.wh.DIR``), directories replaced wholesale (``.wh..wh..opq`` plus
   new files), and base files rewritten with new content.

Written under ``CACHE/pull-image-<key>/``:

``layers/N.tar``       the uncompressed layer tars (for the ``tar -xf`` reference)
``oci/``               an OCI image layout with gzip layers (ref ``1``); its layer blobs
                       are what the suite pushes to the registry and what ``tar -xzf`` reads
``docker-archive.tar`` `docker save`-style archive (uncompressed ``<id>/layer.tar``,
                       ``manifest.json`` with RepoTags ``bench/pull:1``)
``expected.json``      the flattened rootfs a correct pull produces
``meta.json``          digests, sizes, counts; written last (its presence = complete)

This synthetic image is the default because it is a pure function of a spec
(byte-identical on every run and machine, no network). ``--image realistic``
selects :mod:`benchmarks.realistic` instead (debootstrap minbase + python3 + a
cleanup layer, built once from the Debian mirror and cached; its bytes follow
the mirror's package versions). :func:`for_run` picks one for a run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from . import synth

IMAGE_VERSION = 1
OCI_REF = "1"
REPO_TAG = "bench/pull:1"
DIR_MODE = 0o755
NEW_MTIME = synth.MTIME + 86_400
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_NAMES = ("base", "app", "delete")


@dataclass(frozen=True)
class ImageSpec:
    base: synth.TreeSpec
    app: synth.TreeSpec
    deleted_files: int      # single-entry whiteouts, spread over both lower layers
    deleted_dirs: int       # whole base directories whited out
    opaque_dirs: int        # base directories replaced (opaque marker + 2 new files each)
    modified_files: int     # base files rewritten in the delete layer
    seed: int = 1

    def key(self) -> str:
        raw = json.dumps([IMAGE_VERSION, synth.GENERATOR_VERSION, asdict(self)], sort_keys=True).encode()
        mb = (self.base.total_bytes + self.app.total_bytes) / 1e6
        return f"{self.base.files + self.app.files}f-{mb:.0f}MB-{hashlib.sha256(raw).hexdigest()[:10]}"

    def describe(self) -> str:
        return (f"3 layers: base {self.base.files:,} files / {self.base.total_bytes / 1e6:.0f} MB "
                f"({self.base.symlinks} symlinks, {self.base.hardlinks} hardlinks), "
                f"app {self.app.files:,} files / {self.app.total_bytes / 1e6:.0f} MB, "
                f"delete layer: {self.deleted_files} file whiteouts, {self.deleted_dirs} directory "
                f"whiteouts, {self.opaque_dirs} opaque dirs, {self.modified_files} rewritten files")


FULL = ImageSpec(
    base=synth.TreeSpec(files=10_000, total_bytes=110_000_000, seed=301, symlinks=800, hardlinks=40, tag="b"),
    app=synth.TreeSpec(files=5_000, total_bytes=50_000_000, seed=302, symlinks=100, hardlinks=20, tag="a"),
    deleted_files=400, deleted_dirs=3, opaque_dirs=2, modified_files=40,
)
QUICK = ImageSpec(
    base=synth.TreeSpec(files=800, total_bytes=6_000_000, seed=311, symlinks=60, hardlinks=5, tag="b"),
    app=synth.TreeSpec(files=300, total_bytes=3_000_000, seed=312, symlinks=10, hardlinks=3, tag="a"),
    deleted_files=30, deleted_dirs=2, opaque_dirs=1, modified_files=5,
)


# ------------------------------------------------------------------ the delete layer


@dataclass
class DeletePlan:
    whiteouts: list[str]            # entries (files, links or whole dirs) deleted
    deleted_dirs: list[str]         # the directories among them
    opaque: list[str]               # directories whose lower content is hidden
    files: list[synth.Entry]        # new files (in opaque dirs) and rewritten base files
    dirs: list[str]                 # directory entries of the layer (ancestors, opaque dirs)


def _under(path: str, dirs) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[:i + 1]) for i in range(len(parts))]


def _pick_disjoint(rng: random.Random, candidates: list[str], n: int, avoid: list[str]) -> list[str]:
    """n directories, none inside or above another one (or inside/above one in *avoid*)."""
    out: list[str] = []
    pool = list(candidates)
    rng.shuffle(pool)
    for d in pool:
        if len(out) == n:
            break
        if any(_under(d, [o]) or _under(o, [d]) for o in out + avoid):
            continue
        out.append(d)
    return out


def delete_plan(spec: ImageSpec, base: list[synth.Entry], app: list[synth.Entry]) -> DeletePlan:
    rng = random.Random(f"pull-image-delete-{spec.seed}")
    # Not top-level directories, and not so deep that they are nearly empty.
    base_dirs = [e.path for e in base if e.kind == "dir" and 1 <= e.path.count("/") <= 3]
    deleted_dirs = _pick_disjoint(rng, base_dirs, spec.deleted_dirs, [])
    opaque = _pick_disjoint(rng, base_dirs, spec.opaque_dirs, deleted_dirs)
    gone = deleted_dirs + opaque
    candidates = [e.path for e in base + app if e.kind != "dir" and not _under(e.path, gone)]
    deleted_files = sorted(rng.sample(candidates, spec.deleted_files))
    dropped = set(deleted_files)
    modifiable = [e for e in base if e.kind == "file" and e.path not in dropped and not _under(e.path, gone)]
    files = []
    for e in sorted(rng.sample(modifiable, spec.modified_files), key=lambda e: e.path):
        files.append(synth.Entry(e.path, "file", size=rng.randint(100, 60_000), mode=e.mode, uid=e.uid,
                                 gid=e.gid, pool=0, offset=rng.randrange(synth.POOL)))
    for d in opaque:
        for k in range(2):
            files.append(synth.Entry(f"{d}/replaced-{k}.conf", "file", size=rng.randint(50, 5_000),
                                     pool=0, offset=rng.randrange(synth.POOL)))
    dirs: set[str] = set(opaque)
    for p in deleted_dirs + deleted_files + [f.path for f in files]:
        dirs.update(_ancestors(p))
    return DeletePlan(whiteouts=sorted(deleted_dirs + deleted_files), deleted_dirs=sorted(deleted_dirs),
                      opaque=sorted(opaque), files=files, dirs=sorted(dirs))


def _whiteout_name(path: str) -> str:
    parent, _, name = path.rpartition("/")
    return f"{parent}/.wh.{name}" if parent else f".wh.{name}"


def write_delete_tar(plan: DeletePlan, pools, fileobj) -> dict:
    items: list[tuple[str, str, synth.Entry | None]] = [(d, "dir", None) for d in plan.dirs]
    items += [(_whiteout_name(p), "whiteout", None) for p in plan.whiteouts]
    items += [(f"{d}/.wh..wh..opq", "whiteout", None) for d in plan.opaque]
    items += [(f.path, "file", f) for f in plan.files]
    items.sort(key=lambda t: t[0])
    nbytes = 0
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for path, kind, e in items:
            ti = tarfile.TarInfo(path)
            ti.uname = ti.gname = ""
            if kind == "dir":
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, DIR_MODE, synth.MTIME
                tf.addfile(ti)
            elif kind == "whiteout":
                ti.mode, ti.mtime = 0o644, NEW_MTIME
                tf.addfile(ti, io.BytesIO(b""))
            else:
                ti.mode, ti.uid, ti.gid, ti.mtime, ti.size = e.mode, e.uid, e.gid, NEW_MTIME, e.size
                nbytes += e.size
                tf.addfile(ti, io.BytesIO(synth._content(e, pools)))
    return {"entries": {"dir": len(plan.dirs), "whiteout": len(plan.whiteouts) + len(plan.opaque),
                        "file": len(plan.files)},
            "file_bytes": nbytes}


# ------------------------------------------------------------------ expected rootfs

# path -> [kind "d"|"f"|"l", mode, uid, gid, size, mtime (s), sha256 or link target]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_tree(spec: ImageSpec, base, app, plan: DeletePlan) -> dict[str, list]:
    tree: dict[str, list] = {}
    for ts, entries in ((spec.base, base), (spec.app, app)):
        pools = synth._pools(ts.seed)
        digests: dict[str, str] = {}
        by_path = {e.path: e for e in entries}
        for e in entries:
            if e.kind == "dir":
                tree[e.path] = ["d", e.mode, e.uid, e.gid, 0, synth.MTIME, None]
            elif e.kind == "file":
                digests[e.path] = _sha(synth._content(e, pools))
                tree[e.path] = ["f", e.mode, e.uid, e.gid, e.size, synth.MTIME, digests[e.path]]
            elif e.kind == "symlink":
                tree[e.path] = ["l", 0o777, e.uid, e.gid, len(os.fsencode(e.link)), synth.MTIME, e.link]
            else:  # hardlink: the target's inode
                t = by_path[e.link]
                tree[e.path] = ["f", t.mode, t.uid, t.gid, t.size, synth.MTIME, digests[e.link]]
    pools = synth._pools(spec.base.seed)
    for p in plan.whiteouts:
        tree.pop(p, None)
    for d in plan.deleted_dirs + plan.opaque:
        prefix = d + "/"
        for p in [p for p in tree if p.startswith(prefix)]:
            del tree[p]
    for d in plan.dirs:
        tree[d] = ["d", DIR_MODE, 0, 0, 0, synth.MTIME, None]
    for f in plan.files:
        tree[f.path] = ["f", f.mode, f.uid, f.gid, f.size, NEW_MTIME, _sha(synth._content(f, pools))]
    return dict(sorted(tree.items()))


# ------------------------------------------------------------------ the cache


@dataclass
class BuiltImage:
    dir: Path
    meta: dict

    @property
    def oci_dir(self) -> Path:
        return self.dir / "oci"

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.oci_dir}:{OCI_REF}"

    @property
    def docker_archive(self) -> Path:
        return self.dir / "docker-archive.tar"

    @property
    def layer_tars(self) -> list[Path]:
        return [self.dir / "layers" / f"{i}.tar" for i in range(len(self.meta["layers"]))]

    @property
    def gzip_blobs(self) -> list[Path]:
        return [self.oci_dir / "blobs" / "sha256" / l["gzip_digest"].split(":", 1)[1] for l in self.meta["layers"]]

    @property
    def diff_ids(self) -> list[str]:
        return [l["diff_id"] for l in self.meta["layers"]]

    def expected(self) -> dict[str, list]:
        return json.loads((self.dir / "expected.json").read_text())


class _Hashing(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, b):
        self.h.update(b)
        self.f.write(b)
        self.n += len(b)
        return len(b)


def _gzip_blob(src: Path, blobs: Path) -> tuple[str, int]:
    """gzip (level 6, no name/mtime, like synth.compressed) into the layout; (digest, size)."""
    tmp = blobs / f".tmp-{src.name}.gz"
    with open(src, "rb") as inp, open(tmp, "wb") as raw:
        out = _Hashing(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0) as z:
            while chunk := inp.read(1 << 20):
                z.write(chunk)
    digest = "sha256:" + out.h.hexdigest()
    os.replace(tmp, blobs / digest.split(":", 1)[1])
    return digest, out.n


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, synth.MTIME
    tf.addfile(ti, io.BytesIO(data))


def _build(spec: ImageSpec, out: Path) -> dict:
    base, app = synth.plan(spec.base), synth.plan(spec.app)
    plan = delete_plan(spec, base, app)
    (out / "layers").mkdir(parents=True)
    layers = []
    for i, name in enumerate(LAYER_NAMES):
        with open(out / "layers" / f"{i}.tar", "wb") as f:
            w = _Hashing(f)
            if name == "delete":
                manifest = write_delete_tar(plan, synth._pools(spec.base.seed), w)
            else:
                manifest = synth.write_tar(spec.base if name == "base" else spec.app, w)
        layers.append({"name": name, "diff_id": "sha256:" + w.h.hexdigest(), "tar_bytes": w.n,
                       "entries": manifest["entries"], "file_bytes": manifest["file_bytes"]})
    meta = write_image(out, layers)
    tree = expected_tree(spec, base, app, plan)
    (out / "expected.json").write_text(json.dumps(tree, separators=(",", ":")))
    return {
        "image_version": IMAGE_VERSION, "spec": asdict(spec), "key": spec.key(),
        "description": spec.describe(), **meta,
        "rootfs_entries": len(tree),
        "rootfs_file_bytes": sum(v[4] for v in tree.values() if v[0] == "f"),
    }


def write_image(out: Path, layers: list[dict]) -> dict:
    """From ``out/layers/N.tar`` (described by *layers*: name, diff_id, tar_bytes, ...): the OCI layout
    with gzip layers and the docker-archive. Adds gzip_digest/gzip_bytes to *layers*; returns meta fields."""
    blobs = out / "oci" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=max(1, min(3, os.cpu_count() or 1))) as pool:  # zlib drops the GIL
        gz = list(pool.map(lambda i: _gzip_blob(out / "layers" / f"{i}.tar", blobs), range(len(layers))))
    for layer, (digest, size) in zip(layers, gz):
        layer.update(gzip_digest=digest, gzip_bytes=size)

    diff_ids = [l["diff_id"] for l in layers]
    config = _canonical({
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"benchmarks.image: {l['name']} layer"}
                    for l in layers],
    })
    config_digest = "sha256:" + _sha(config)
    (blobs / config_digest.split(":", 1)[1]).write_bytes(config)
    manifest = _canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": l["gzip_digest"], "size": l["gzip_bytes"]}
                   for l in layers],
    })
    manifest_digest = "sha256:" + _sha(manifest)
    (blobs / manifest_digest.split(":", 1)[1]).write_bytes(manifest)
    (out / "oci" / "index.json").write_bytes(_canonical({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": OCI_REF}}],
    }))
    (out / "oci" / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    # `docker save` layout: <config hex>.json, <id>/layer.tar (uncompressed), manifest.json.
    config_hex = config_digest.split(":", 1)[1]
    with tarfile.open(out / "docker-archive.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        _add_bytes(tf, f"{config_hex}.json", config)
        names = []
        for i, layer in enumerate(layers):
            name = f"{layer['diff_id'].split(':', 1)[1]}/layer.tar"
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = layer["tar_bytes"], 0o644, synth.MTIME
            with open(out / "layers" / f"{i}.tar", "rb") as f:
                tf.addfile(ti, f)
            names.append(name)
        _add_bytes(tf, "manifest.json", json.dumps(
            [{"Config": f"{config_hex}.json", "RepoTags": [REPO_TAG], "Layers": names}]).encode())

    return {
        "layers": layers,
        "config_digest": config_digest, "manifest_digest": manifest_digest,
        "tar_bytes": sum(l["tar_bytes"] for l in layers),
        "gzip_bytes": sum(l["gzip_bytes"] for l in layers),
        "file_bytes": sum(l["file_bytes"] for l in layers),
        "docker_archive_bytes": (out / "docker-archive.tar").stat().st_size,
    }


def _reap(cache_dir: Path) -> None:
    """Remove half-built images of runs that died."""
    for d in cache_dir.glob(".pull-image-*.tmp*"):
        try:
            pid = int(d.name.rsplit(".tmp", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def cached(spec: ImageSpec, cache_dir: Path, log=lambda msg: None) -> BuiltImage:
    """The image for *spec* under *cache_dir*, built on first use."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"pull-image-{spec.key()}"
    if (final / "meta.json").is_file():
        return BuiltImage(final, json.loads((final / "meta.json").read_text()))
    _reap(cache_dir)
    if final.exists():  # incomplete (no meta.json): start over
        shutil.rmtree(final)
    tmp = cache_dir / f".pull-image-{spec.key()}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"building the pull image {final.name} (once; cached): {spec.describe()}")
    try:
        tmp.mkdir()
        meta = _build(spec, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BuiltImage(final, meta)


def for_run(ctx, log=lambda msg: None) -> BuiltImage:
    """The image of this run: ``--image synthetic`` (FULL, or QUICK with --quick) or ``realistic``."""
    if getattr(ctx, "image", "synthetic") == "realistic":
        from . import realistic
        return realistic.cached(ctx.cache_dir, log=log)
    return cached(ctx.pick(FULL, QUICK), ctx.cache_dir, log=log)
