"""pull: a 3-layer, 160 MB image from a local registry and from a docker-archive, against tar -x.

Input: the deterministic image of :mod:`benchmarks.image` (a Debian-like base,
a ~50 MB application layer, a layer of whiteouts/opaque dirs/rewrites), cached
under the out dir as gzip layers in an OCI layout, a docker-archive
(uncompressed layers, as `docker save` writes) and the plain layer tars.

The suite starts Debian's ``docker-registry`` on 127.0.0.1 (storage in the run's
work dir) and puts the image there with layerfs itself: pull from the OCI layout
into a seed store, hand that store the layout's gzip blobs (so the registry gets
them byte for byte: the ``tar -xzf`` reference reads the very blobs the pulls
download), push. The registry is stopped by PID when the suite ends.

Contenders, alternated round by round, each layerfs round into a fresh store
(opened untimed, then an untimed ``sync``; the stores and tar directories are
removed when the suite ends: see ``RunContext.remove_later``):

- ``pull.registry``            pull from the registry, parallel apply (the default)
                               vs ``tar -xzf`` of each gzip layer into its own
                               directory, one after another; target ≤ 1.3×
- ``pull.registry.sequential`` the same pull with ``PullOptions(parallel=False)``
                               vs the parallel one (ratio = sequential / parallel)
- ``pull.oci``                 pull from the OCI layout (gzip blobs read in place,
                               no download) vs ``tar -xzf``; reported
- ``pull.docker-archive``      pull of the docker-archive (uncompressed layers read
                               in place) vs ``tar -xf`` of the same layer tars; ≤ 1.3×
- ``pull.docker``              layerfs vs ``docker pull`` of the same image from the
                               local registry (dockerd with overlay2, and with
                               fuse-overlayfs) and ``podman pull`` (overlay, vfs,
                               overlay + fuse-overlayfs); target ≤ 0.6× docker overlay2
- ``pull.docker-load``         layerfs pull of the docker-archive vs ``docker load``
                               (overlay2, fuse-overlayfs), ``ctr image import``
                               (containerd, overlayfs snapshotter, unpacked) and
                               ``podman load`` (overlay, vfs, overlay + fuse-overlayfs);
                               ≤ 0.6× ``docker load`` (overlay2)

The peers' daemons are private (:mod:`benchmarks.peers.daemons`: own socket and
data dir under the work dir, nothing on the network), started for this suite and
stopped by PID at its end; a peer not installed or failing to start is left out
with the reason. A peer removes its previous image (untimed) at the start of its
own next round (see ``PEER_CLEANUP_NOTE``).

Each layerfs way of pulling is verified once, in its first (untimed, warm-up)
round: the image's rootfs is mounted and compared with the expected tree (type,
size, content, link target; mode/owner/mtime differences are noted). Inputs
(layout blobs, registry blobs, archive, layer tars) are kept warm in page cache.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .. import image as bench_image
from .. import registry as bench_registry
from .. import peers as bench_peers
from .. import synth
from ..machine import _first_line as _tool_version
from ..runner import Benchmark, Contender, SkipBenchmark, Target, stopwatch

REPO = "bench/pull:1"
LOCAL_NAME = "bench-pull:1"
CACHE_NOTE = ("inputs warm in page cache for every contender (read through before and between rounds); "
              "no fs sync in any timed region; fresh store / fresh directories each round, an untimed `sync` "
              "after it; layerfs stores and tar directories are removed when the suite ends, not between rounds "
              "(ext4 without a journal makes a create scan the inodes freed in the last 60 s: "
              "RunContext.remove_later); each peer removes its previous image at the start of its own next round")


# Why peers clean up before their own round and not after it.
PEER_CLEANUP_NOTE = (
    "each peer removes its previous round's image (untimed) at the start of its own next round, not at the end "
    "of the round: on ext4 without a journal (these machines) every create scans the inodes freed in the last "
    "60 s, so a removal right before another contender's round would make that contender pay for it (measured: "
    "a layerfs pull took 1.76 s right after `docker rmi` and 0.68 s otherwise); this way whoever deletes pays, "
    "as a user doing `rmi` then `pull` does; layerfs rounds use fresh stores removed when the suite ends")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ verification


def _walk(root: Path) -> dict[str, list]:
    """path -> [kind, mode, uid, gid, size, mtime (s), sha256 | link | None], as image.expected_tree."""
    import hashlib

    out: dict[str, list] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            m = st.st_mode
            if stat.S_ISREG(m):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                out[rel] = ["f", stat.S_IMODE(m), st.st_uid, st.st_gid, st.st_size, int(st.st_mtime), h.hexdigest()]
            elif stat.S_ISLNK(m):
                out[rel] = ["l", 0o777, st.st_uid, st.st_gid, st.st_size, int(st.st_mtime), os.readlink(p)]
            elif stat.S_ISDIR(m):
                out[rel] = ["d", stat.S_IMODE(m), st.st_uid, st.st_gid, 0, int(st.st_mtime), None]
            else:
                out[rel] = ["?" + oct(stat.S_IFMT(m)), stat.S_IMODE(m), st.st_uid, st.st_gid, st.st_size,
                            int(st.st_mtime), None]
    return out


def compare(want: dict[str, list], got: dict[str, list], what: str) -> str:
    """Raise when entries or content differ; return a note (metadata differences are only noted)."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    content = [p for p in sorted(set(want) & set(got))
               if (want[p][0], want[p][4], want[p][6]) != (got[p][0], got[p][4], got[p][6])]
    if missing or extra or content:
        raise AssertionError(
            f"{what}: rootfs differs from the expected tree: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} extra (e.g. {extra[:3]}), {len(content)} with other type/size/content "
            f"(e.g. {content[:3]})")
    meta = [p for p in want if want[p][1:4] != got[p][1:4]]
    times = [p for p in want if want[p][5] != got[p][5]]
    note = f"verified ({what}): rootfs = expected tree, {len(want):,} entries (type, size, content, link target"
    if not meta and not times:
        return note + ", mode, owner, mtime)"
    parts = []
    if meta:
        parts.append(f"{len(meta)} differ in mode/owner (e.g. {meta[0]}: want {want[meta[0]][1:4]}, "
                     f"got {got[meta[0]][1:4]})")
    if times:
        kinds = sorted({want[p][0] for p in times})
        parts.append(f"{len(times)} differ in mtime (kinds {kinds}; e.g. {times[0]}: want "
                     f"{want[times[0]][5]}, got {got[times[0]][5]})")
    return note + "); but " + "; ".join(parts)


def verify_image(images, name: str, expected: dict, what: str) -> str:
    img = images.image(name)
    top = img.top_chain
    mnt = images.store.mount(top)
    try:
        got = _walk(Path(mnt))
    finally:
        images.store.unmount(top)
    return compare(expected, got, what)


# ------------------------------------------------------------------ contenders


def _pull_contender(ctx, built, label: str, source: str, parallel: bool, verified: dict,
                    notes_for: list[list[str]]) -> Contender:
    from layerfs.engine.images import ImageStore
    from layerfs.engine.pull import PullOptions, pull

    key = (source, parallel)
    config_digest = built.meta["config_digest"]

    def once() -> float:
        root = ctx.scratch("store")
        try:
            store = ctx.open_store(root)
            try:
                images = ImageStore(store)
                opts = PullOptions(parallel=parallel)
                ctx.settle()
                with stopwatch() as t:
                    img = pull(images, source, LOCAL_NAME, opts)
                if len(img.chain) != 3 or img.config_digest != config_digest:
                    raise AssertionError(f"{label}: got {len(img.chain)} layers, config {img.config_digest}")
                if key not in verified:  # once per way of pulling, untimed
                    verified[key] = verify_image(images, LOCAL_NAME, built.expected(), label)
                    for notes in notes_for:
                        notes.append(verified[key])
            finally:
                store.close()
        finally:
            ctx.remove_later(root)  # see RunContext.remove_later
            os.sync()
        return t.elapsed

    call = f"pull(ImageStore(store), {source!r}, {LOCAL_NAME!r}, PullOptions(parallel={parallel}))"
    return Contender(label, once, role="layerfs", info={"call": call, "driver": ctx.driver})


def _tar_contender(ctx, paths: list[Path], gz: bool) -> Contender:
    flag = "-xzf" if gz else "-xf"
    label = f"tar {flag} ×{len(paths)} layers"

    def once() -> float:
        dest = ctx.scratch("tar")
        try:
            ctx.settle()
            with stopwatch() as t:
                for i, p in enumerate(paths):
                    d = dest / f"layer{i}"
                    d.mkdir()
                    subprocess.run(["tar", flag, str(p), "-C", str(d)], check=True)
        finally:
            ctx.remove_later(dest)
            os.sync()
        return t.elapsed

    info = {"command": f"for each layer, in order: mkdir DIR_i; tar {flag} LAYER_i -C DIR_i",
            "tar": _tool_version(["tar", "--version"])}
    if gz:
        info["gzip"] = _tool_version(["gzip", "--version"])
    return Contender(label, once, role="reference", info=info)


def _start_peers(ctx) -> tuple[dict, dict[str, str]]:
    """Private daemons: {label: daemon} and {label: why it is left out}."""
    from ..peers.daemons import Containerd, DaemonFailed, Dockerd

    daemons, why = {}, {}
    plan = [("docker overlay2", "docker", lambda base: Dockerd(base, "overlay2")),
            ("docker fuse-overlayfs", "docker", lambda base: Dockerd(base, "fuse-overlayfs")),
            ("containerd", "containerd", lambda base: Containerd(base))]
    for label, peer, make in plan:
        if not ctx.peer_wanted(peer):
            why[label] = "not selected (--peers)"
            continue
        miss = bench_peers.missing(peer)
        if label == "docker fuse-overlayfs" and not miss:
            miss = bench_peers.missing("fuse-overlayfs")
        if miss:
            why[label] = miss
            continue
        try:
            daemons[label] = make(ctx.scratch(label.replace(" ", "-"))).start()
        except DaemonFailed as e:
            why[label] = f"failed to start here: {e}"
    return daemons, why


def _peer_round(ctx, cleanup: Callable[[], None], run: Callable[[], None]) -> float:
    """One peer round: remove the previous round's image, untimed (see PEER_CLEANUP_NOTE), then time *run*."""
    cleanup()
    os.sync()
    ctx.freed()
    ctx.settle()
    with stopwatch() as t:
        run()
    os.sync()
    return t.elapsed


def _docker_contender(ctx, kind: str, ref: str, archive: Path, daemon, label: str) -> Contender:
    """``docker pull REF`` or ``docker load -i ARCHIVE``; the previous image is removed (untimed) before each."""
    docker = daemon.docker
    cmd = docker + (["pull", "-q", ref] if kind == "pull" else ["load", "-q", "-i", str(archive)])

    def rmi():
        # Both names: the pull and load rows share a daemon, and a layer left by one would make the other instant.
        subprocess.run(docker + ["rmi", "-f", REPO, ref], capture_output=True)

    def once() -> float:
        return _peer_round(ctx, rmi, lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                                                            stderr=subprocess.PIPE))

    return Contender(f"{label.replace('docker', 'docker ' + kind, 1)}", once, role="reference",
                     info={"command": " ".join(["docker", kind] + cmd[len(docker) + 1:]),
                           "dockerd": bench_peers.version("docker"), "storage_driver": daemon.storage_driver,
                           "pid": daemon.pid, "data_root": str(daemon.base / "root")})


def _ctr_import_contender(ctx, daemon, archive: Path) -> Contender:
    """``ctr images import ARCHIVE`` (unpacks into the overlayfs snapshotter); the previous image removed (--sync) first, untimed."""
    ctr = daemon.ctr

    def clean():
        names = subprocess.run(ctr + ["images", "ls", "-q"], capture_output=True, text=True).stdout.split()
        if names:
            subprocess.run(ctr + ["images", "rm", "--sync", *names], capture_output=True)
        left = subprocess.run(ctr + ["snapshots", "ls"], capture_output=True, text=True).stdout.strip().splitlines()
        if len(left) > 1:
            raise RuntimeError(f"ctr images rm --sync left {len(left) - 1} snapshot(s)")

    def once() -> float:
        return _peer_round(ctx, clean, lambda: subprocess.run(ctr + ["images", "import", str(archive)], check=True,
                                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    return Contender("ctr image import", once, role="reference",
                     info={"command": "ctr images import ARCHIVE (unpack to overlayfs)",
                           "containerd": bench_peers.version("containerd"), "pid": daemon.pid})


def _podman_contender(ctx, kind: str, pm, ref: str, archive: Path) -> Contender:
    """``podman pull REF`` (local registry, --tls-verify=false) or ``podman load -i ARCHIVE``.

    Every image is removed (``podman rmi -af``, untimed) before each round.
    """
    def once() -> float:
        return _peer_round(ctx, pm.rmi_all, (lambda: pm.pull(ref)) if kind == "pull" else (lambda: pm.load(archive)))

    cmd = f"podman pull -q --tls-verify=false {ref}" if kind == "pull" else "podman load -q -i ARCHIVE"
    return Contender(f"podman {kind} {pm.flavour}", once, role="reference", info={"command": cmd, **pm.info()})


def _start_podmans(ctx) -> tuple[list, dict[str, str]]:
    """Private podman stores (overlay, vfs, overlay + fuse-overlayfs) and {label: why left out}."""
    from ..peers.podman import FLAVOURS, Podman, PodmanFailed

    out, why = [], {}
    for fl in FLAVOURS:
        label = f"podman {fl}"
        if not ctx.peer_wanted("podman"):
            why[label] = "not selected (--peers)"
            continue
        miss = Podman.unavailable(fl)
        if miss:
            why[label] = miss
            continue
        try:
            out.append(Podman(ctx.scratch(f"podman-{fl}"), fl).setup())
        except PodmanFailed as e:
            why[label] = f"failed here: {e}"
    return out, why


def _skipped(reason: str):
    def once() -> float:
        raise SkipBenchmark(reason)
    return once


# ------------------------------------------------------------------ setup


def _seed_registry(ctx, built, reg, repo: str = REPO) -> tuple[str, str]:
    """Put the image into the registry byte for byte; returns (reference, pushed manifest digest)."""
    from layerfs.engine.images import ImageStore
    from layerfs.engine.pull import pull
    from layerfs.engine.push import push

    root = ctx.scratch("seed-store")
    try:
        with ctx.open_store(root) as store:
            images = ImageStore(store)
            pull(images, built.oci_ref, "seed:1")
            # A pull from a local layout keeps no blobs; give the store the originals so
            # that push sends them as they are instead of re-exporting and recompressing.
            for layer, path in zip(built.meta["layers"], built.gzip_blobs):
                with open(path, "rb") as f:
                    images.content.ingest(f, layer["gzip_digest"], layer["gzip_bytes"])
            ref = f"docker://{reg.host}/{repo}"
            digest = push(images, "seed:1", ref, compression="gzip")
    finally:
        ctx.remove(root)
    # The registry must hold exactly the layout's layer blobs.
    blobs = {p.parent.name for p in reg.blob_files()}
    missing = [l["gzip_digest"] for l in built.meta["layers"] if l["gzip_digest"].split(":", 1)[1] not in blobs]
    if missing:
        raise AssertionError(f"the registry does not hold the layout's layer blobs {missing} after push")
    return ref, digest


def suite(ctx):
    ctx.layerfs()  # skip early, before generating inputs, when the library is missing
    try:
        import layerfs.engine.pull  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise SkipBenchmark(f"layerfs.engine cannot be imported: {type(e).__name__}: {e}") from e
    built = bench_image.for_run(ctx, log=_log)
    meta = built.meta
    reg = None
    started = []
    try:
        reg = bench_registry.start(ctx.scratch("registry"))
        _log(f"[pull] registry {reg.version or ''} on {reg.host} (pid {reg.pid}); pushing the image")
        ref, pushed = _seed_registry(ctx, built, reg)
        os.sync()
        reg_blobs = reg.blob_files()

        def warm(paths):
            def go():
                for p in paths:
                    synth.read_through(p)
            return go

        gz_blobs, tars = built.gzip_blobs, built.layer_tars
        archive = built.docker_archive
        warm_registry = warm(reg_blobs + gz_blobs)
        warm_oci = warm(gz_blobs)
        warm_archive = warm([archive] + tars)
        warm_registry()
        warm_archive()

        workload = {
            "image": meta["description"], "key": meta["key"], "description": meta["description"],
            "layers": meta["layers"], "tar_bytes": meta["tar_bytes"], "gzip_bytes": meta["gzip_bytes"],
            "file_bytes": meta["file_bytes"], "rootfs_entries": meta["rootfs_entries"],
            "rootfs_file_bytes": meta["rootfs_file_bytes"], "docker_archive_bytes": meta["docker_archive_bytes"],
            "registry": {"host": reg.host, "reference": ref, "manifest_digest": pushed,
                         "version": reg.version, "pid": reg.pid},
        }
        size = (f"{meta['tar_bytes'] / 1e6:.0f} MB ({meta['gzip_bytes'] / 1e6:.0f} MB gzip), "
                f"{meta['rootfs_entries']:,}-entry rootfs")
        sizes_note = (f"image: {meta['tar_bytes'] / 1e6:.1f} MB of layer tars, {meta['gzip_bytes'] / 1e6:.1f} MB "
                      f"gzip (level 6), rootfs {meta['rootfs_entries']:,} entries / "
                      f"{meta['rootfs_file_bytes'] / 1e6:.1f} MB after whiteouts; "
                      + ("realistic: debootstrap minbase + python3 + cleanup layer, built "
                         f"{meta.get('built_utc')} from {meta.get('mirror')} (benchmarks/realistic.py)"
                         if meta.get("kind") == "realistic" else
                         "synthetic and deterministic (benchmarks/image.py; --image realistic for debootstrap)"))
        verified: dict = {}
        # The contenders add their verification note to these lists (the Benchmarks' own notes).
        n_reg = [sizes_note, CACHE_NOTE,
                 "layerfs downloads the blobs over HTTP from 127.0.0.1 into its content store (verifying "
                 "digests), then applies; tar reads the same gzip blobs from the page cache"]
        n_seq = ["ratio = sequential / parallel (> 1: parallel apply helps)", CACHE_NOTE]
        n_oci = ["reported, no target: isolates the cost of the registry transport", CACHE_NOTE]
        n_arc = ["the archive's layers are uncompressed, so the reference is `tar -xf` of the same layer "
                 "tars (`tar -xzf` of the gzip layers would flatter layerfs)", CACHE_NOTE]

        reg_par = _pull_contender(ctx, built, "layerfs pull registry", ref, True, verified, [n_reg, n_seq])
        reg_seq = _pull_contender(ctx, built, "layerfs pull registry parallel=False", ref, False, verified, [n_seq])
        oci = _pull_contender(ctx, built, "layerfs pull oci", built.oci_ref, True, verified, [n_oci])
        arc = _pull_contender(ctx, built, "layerfs pull docker-archive", f"docker-archive:{archive}", True,
                              verified, [n_arc])
        tar_gz = _tar_contender(ctx, gz_blobs, gz=True)
        tar_x = _tar_contender(ctx, tars, gz=False)

        yield Benchmark(
            name="pull.registry",
            description=f"pull a {size} image from a local registry into a fresh store (parallel apply)",
            contenders=[reg_par, tar_gz], subject=reg_par.name, reference=tar_gz.name,
            target=Target.ratio(1.3), runs=7, quick_runs=2,
            workload=workload,
            notes=n_reg,
            between_rounds=warm_registry,
        )
        yield Benchmark(
            name="pull.registry.sequential",
            description="the same registry pull with PullOptions(parallel=False) vs parallel apply",
            contenders=[reg_seq, reg_par], subject=reg_seq.name, reference=reg_par.name,
            runs=5, quick_runs=2, workload=workload,
            notes=n_seq,
            between_rounds=warm_registry,
        )
        yield Benchmark(
            name="pull.oci",
            description="pull the same image from the OCI layout (gzip blobs read in place, no download)",
            contenders=[oci, tar_gz], subject=oci.name, reference=tar_gz.name,
            runs=5, quick_runs=2, workload=workload,
            notes=n_oci,
            between_rounds=warm_oci,
        )
        yield Benchmark(
            name="pull.docker-archive",
            description="pull the image from a docker-archive (uncompressed layers, read in place)",
            contenders=[arc, tar_x], subject=arc.name, reference=tar_x.name,
            target=Target.ratio(1.3), runs=7, quick_runs=2,
            workload={**workload, "docker_archive": archive.name},
            notes=n_arc,
            between_rounds=warm_archive,
        )

        daemons, why_not = _start_peers(ctx)
        started.extend(daemons.values())
        podmans, pm_why = _start_podmans(ctx)
        started.extend(podmans)
        why_not.update(pm_why)
        peer_notes = [f"{k} left out: {v}" for k, v in why_not.items()]
        peer_notes += [f"{pm.label}: daemonless, private --root/--runroot/storage.conf/containers.conf under the "
                       "run's work dir; every image removed (rmi -af) before and after each round, untimed"
                       for pm in podmans]
        peer_notes += [f"{d.name} (pid {d.pid}) on a private socket and data dir under the run's work dir; "
                       "stopped by PID at the end of the suite" for d in daemons.values()]
        peer_notes.append(PEER_CLEANUP_NOTE)
        peer_notes.append(
            f"--settle {ctx.settle_s:g}: no timed round started until {ctx.settle_s:g} s after a peer's untimed image "
            "removal (freed inodes stop costing creates)" if ctx.settle_s > 0 else
            "no --settle: a peer's round starts right after it removed its previous image")
        d_pulls = [_docker_contender(ctx, "pull", f"{reg.host}/{REPO}", archive, daemons[k], k)
                   for k in ("docker overlay2", "docker fuse-overlayfs") if k in daemons]
        loads = [_docker_contender(ctx, "load", f"{reg.host}/{REPO}", archive, daemons[k], k)
                 for k in ("docker overlay2", "docker fuse-overlayfs") if k in daemons]
        if "containerd" in daemons:
            loads.append(_ctr_import_contender(ctx, daemons["containerd"], archive))
        d_pulls += [_podman_contender(ctx, "pull", pm, f"{reg.host}/{REPO}", archive) for pm in podmans]
        loads += [_podman_contender(ctx, "load", pm, f"{reg.host}/{REPO}", archive) for pm in podmans]
        if not d_pulls:
            d_pulls = [Contender("docker pull", _skipped("; ".join(peer_notes) or "no docker"), role="reference")]
        if not loads:
            loads = [Contender("docker load", _skipped("; ".join(peer_notes) or "no docker/containerd"),
                               role="reference")]
        yield Benchmark(
            name="pull.docker",
            description="layerfs pull vs `docker pull` of the same image from the local registry",
            contenders=[reg_par] + d_pulls,
            subject=reg_par.name, reference=d_pulls[0].name, target=Target.ratio(0.6),
            runs=7, quick_runs=1, workload=workload, notes=[CACHE_NOTE] + peer_notes,
            between_rounds=warm_registry,
        )
        yield Benchmark(
            name="pull.docker-load",
            description="layerfs pull of the docker-archive vs `docker load` / `ctr image import` of it",
            contenders=[arc] + loads,
            subject=arc.name, reference=loads[0].name, target=Target.ratio(0.6),
            runs=7, quick_runs=1, workload=workload,
            notes=[CACHE_NOTE, "ratio and target are against the first peer (docker load, overlay2); "
                   "every peer's figure is in the every-contender table"] + peer_notes,
            between_rounds=warm_archive,
        )
    finally:
        for d in started:
            if hasattr(d, "stop"):
                d.stop()
            else:
                d.cleanup()
        if reg is not None:
            reg.stop()
