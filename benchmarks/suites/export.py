"""export and gc: writing an image out, and removing an image so that its layers are freed.

Input: the pull suite's image (:mod:`benchmarks.image`; ``--image realistic`` for the
debootstrap one), loaded into every system from the same docker-archive, untimed:
layerfs ``pull docker-archive:…`` into one store per driver, ``docker load``
(private dockerd, overlay2 and fuse-overlayfs), ``ctr image import`` (private
containerd, overlayfs snapshotter) and ``podman load`` (overlay, vfs, overlay +
fuse-overlayfs), each peer started as the pull suite starts it
(:func:`benchmarks.suites.pull._start_peers`, ``_start_podmans``).

Rows (contenders alternated round by round, as everywhere in the harness):

``export.docker-archive``  layerfs ``push IMAGE docker-archive:FILE`` (``--compress none``:
                           layers re-exported from the store and hashed, as ``docker save``
                           does) vs ``docker save -o FILE`` (overlay2, fuse-overlayfs),
                           ``podman save --format docker-archive`` (each flavour) and the
                           floor: GNU ``tar -cf`` of each layer directory of the overlay2
                           store (no image format, no digests).
``export.oci``             layerfs ``push IMAGE oci-archive:FILE`` (``--compress none``) vs
                           ``ctr image export FILE`` (copies the blobs it kept at import),
                           ``podman save --format oci-archive`` and the same ``tar -cf`` floor.
``gc.image``               remove the image and free its layers: layerfs ``ImageStore.remove``
                           + ``gc()`` (in process) and ``layerfs rmi`` + ``layerfs gc`` (CLI,
                           two process starts) vs ``docker rmi`` + ``docker image prune -f``,
                           ``ctr image rm --sync`` (containerd's gc runs before it returns)
                           and ``podman rmi``. The image is loaded again before every round
                           (untimed, then an untimed ``sync``: nobody pays for the load's
                           writeback).

Caches: the loaded layers are warm in page cache for every exporter (an untimed warm-up
round each); every export writes a fresh file in the run's work dir, removed untimed after
the round, then an untimed ``sync``; no timed region contains a sync (exported bytes may
still be in page cache when the clock stops, for every system alike).

Verification, untimed: each exporter's first archive is pulled back into a fresh layerfs
store (``docker-archive:``/``oci-archive:``; the pull checks every layer's diff id against
the archive's config) and its rootfs compared with the expected tree; the notes say whether
the layers came out byte-identical to the input (same diff ids). After every gc round the
system is checked to be empty: no image, no layer directory (layerfs: no layer rows, no
driver directory; docker: no image, nothing but ``l/`` in its storage driver dir; podman:
no image, no layer; ctr: no image, no snapshot, no content blob).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .. import image as bench_image
from .. import synth
from ..machine import _first_line as _tool_version
from ..runner import Benchmark, Contender, SkipBenchmark, stopwatch
from .pull import _start_peers, _start_podmans, verify_image
from .scaling import _layer_dirs

NAME = "bench-export:1"
CACHE_NOTE = ("same docker-archive loaded into every system (untimed); layers warm in page cache (an untimed "
              "warm-up round each); a fresh output file per round, removed untimed, then an untimed `sync`; "
              "no sync in any timed region")
GC_NOTE = ("the image is loaded again before every round (untimed, then an untimed `sync`); timed: the removal "
           "until the command / call returns; after each round the system is checked to hold no image and no "
           "layer directory")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(cmd: list[str], env=None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:1] + cmd[-3:])} exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return r.stdout


# ------------------------------------------------------------------ the systems


class LayerfsSystem:
    """One layerfs store (one driver) holding the image, through the public API."""

    role = "layerfs"

    def __init__(self, ctx, driver: str, archive: Path):
        from layerfs.engine.images import ImageStore

        self.ctx, self.driver, self.archive = ctx, driver, archive
        self.root = ctx.scratch(f"export-store-{driver}")
        self.store = ctx.layerfs().open_store(str(self.root), driver=driver, options=ctx.options)
        self.images = ImageStore(self.store)
        self.label = f"layerfs {driver}"

    def info(self) -> dict:
        return {"driver": self.driver, "root": str(self.root)}

    def load(self) -> None:
        from layerfs.engine.pull import pull
        pull(self.images, f"docker-archive:{self.archive}", NAME)

    def export(self, kind: str, path: Path) -> None:
        from layerfs.engine.push import push
        push(self.images, NAME, f"{kind}:{path}", compression="none")

    def remove(self) -> None:
        self.images.remove(NAME)
        self.images.gc()

    def leftovers(self) -> str | None:
        layers = self.store.layers()
        ids = self.store.driver.ids()
        if layers or ids or self.images.images():
            return f"{len(layers)} layer(s), {len(ids)} driver dir(s), {len(self.images.images())} image(s) left"
        return None

    def close(self) -> None:
        self.store.close()
        self.ctx.remove(self.root)


class LayerfsCliRemove(LayerfsSystem):
    """The same store, removal through the CLI: ``layerfs rmi`` + ``layerfs gc`` (two process starts)."""

    def __init__(self, ctx, driver: str, archive: Path):
        super().__init__(ctx, driver, archive)
        self.label = f"layerfs {driver} CLI"
        self.cli = ctx.for_driver(driver).cli() + ["--root", str(self.root)]
        self.store.close()

    def info(self) -> dict:
        return {**super().info(), "commands": "layerfs --root R rmi IMAGE; layerfs --root R gc"}

    def load(self) -> None:
        # The store is open only between the CLI's runs (untimed): the CLI opens it itself.
        self._reopen()
        try:
            super().load()
        finally:
            self.store.close()

    def remove(self) -> None:
        _run(self.cli + ["rmi", NAME])
        _run(self.cli + ["gc"])

    def leftovers(self) -> str | None:
        self._reopen()
        try:
            return super().leftovers()
        finally:
            self.store.close()

    def close(self) -> None:
        self._reopen()
        super().close()

    def _reopen(self) -> None:
        from layerfs.engine.images import ImageStore
        self.store = self.ctx.layerfs().open_store(str(self.root), driver=self.driver, options=self.ctx.options)
        self.images = ImageStore(self.store)


class DockerSystem:
    role = "reference"

    def __init__(self, label: str, daemon, archive: Path):
        self.label, self.d, self.archive = label, daemon, archive

    def info(self) -> dict:
        from .. import peers
        return {"dockerd": peers.version("docker"), "storage_driver": self.d.storage_driver, "pid": self.d.pid,
                "commands": "docker save -o FILE IMAGE; docker rmi IMAGE + docker image prune -f"}

    def load(self) -> None:
        _run(self.d.docker + ["load", "-q", "-i", str(self.archive)])

    def export(self, kind: str, path: Path) -> None:
        _run(self.d.docker + ["save", "-o", str(path), bench_image.REPO_TAG])

    def remove(self) -> None:
        _run(self.d.docker + ["rmi", bench_image.REPO_TAG])
        _run(self.d.docker + ["image", "prune", "-f"])

    def leftovers(self) -> str | None:
        ids = _run(self.d.docker + ["image", "ls", "-aq"]).split()
        driver_dir = self.d.base / "root" / self.d.storage_driver
        dirs = [p.name for p in driver_dir.iterdir() if p.name != "l"] if driver_dir.is_dir() else []
        if ids or dirs:
            return f"{len(ids)} image(s), {len(dirs)} layer dir(s) left under {driver_dir}"
        return None

    def close(self) -> None:
        subprocess.run(self.d.docker + ["rmi", "-f", bench_image.REPO_TAG], capture_output=True, check=False)


class CtrSystem:
    role = "reference"
    label = "ctr (overlayfs)"

    def __init__(self, daemon, archive: Path):
        self.d, self.archive = daemon, archive

    def info(self) -> dict:
        from .. import peers
        return {"containerd": peers.version("containerd"), "pid": self.d.pid, "snapshotter": "overlayfs",
                "commands": "ctr images export FILE IMAGE; ctr images rm --sync IMAGE"}

    def _names(self) -> list[str]:
        return _run(self.d.ctr + ["images", "ls", "-q"]).split()

    def load(self) -> None:
        _run(self.d.ctr + ["images", "import", str(self.archive)])

    def export(self, kind: str, path: Path) -> None:
        _run(self.d.ctr + ["images", "export", str(path), *self._names()])

    def remove(self) -> None:
        _run(self.d.ctr + ["images", "rm", "--sync", *self._names()])

    def leftovers(self) -> str | None:
        snaps = _run(self.d.ctr + ["snapshots", "ls"]).strip().splitlines()[1:]
        blobs = _run(self.d.ctr + ["content", "ls", "-q"]).split()
        if self._names() or snaps or blobs:
            return f"{len(self._names())} image(s), {len(snaps)} snapshot(s), {len(blobs)} blob(s) left"
        return None

    def close(self) -> None:
        names = self._names()
        if names:
            subprocess.run(self.d.ctr + ["images", "rm", "--sync", *names], capture_output=True, check=False)


class PodmanSystem:
    role = "reference"

    def __init__(self, pm, archive: Path):
        self.pm, self.archive = pm, archive
        self.label = pm.label

    def info(self) -> dict:
        return {**self.pm.info(), "commands": "podman save --format docker-archive|oci-archive -o FILE IMAGE; "
                                              "podman rmi IMAGE"}

    def load(self) -> None:
        self.pm.load(self.archive)

    def export(self, kind: str, path: Path) -> None:
        self.pm.run("save", "-q", "--format", kind, "-o", str(path), bench_image.REPO_TAG)

    def remove(self) -> None:
        self.pm.run("rmi", bench_image.REPO_TAG)

    def leftovers(self) -> str | None:
        ids = self.pm.run("images", "-aq").stdout.split()
        layers_json = self.pm.root / ("vfs-layers" if self.pm.flavour == "vfs" else "overlay-layers") / "layers.json"
        layers = json.loads(layers_json.read_text() or "[]") if layers_json.is_file() else []
        if ids or layers:
            return f"{len(ids)} image(s), {len(layers)} layer(s) left"
        return None

    def close(self) -> None:
        self.pm.rmi_all()


def systems(ctx, archive: Path, notes: list[str], cli_remove: bool = False) -> tuple[list, list]:
    """Every system of this run with the image loaded once (untimed); (systems, things to stop)."""
    out: list = []
    started: list = []
    try:
        for d in ctx.drivers:
            out.append(LayerfsSystem(ctx, d, archive))
        if cli_remove and ctx.drivers:
            out.append(LayerfsCliRemove(ctx, ctx.drivers[0], archive))
        daemons, why = _start_peers(ctx)
        started += daemons.values()
        for label in ("docker overlay2", "docker fuse-overlayfs"):
            if label in daemons:
                out.append(DockerSystem(label, daemons[label], archive))
        if "containerd" in daemons:
            out.append(CtrSystem(daemons["containerd"], archive))
        podmans, pm_why = _start_podmans(ctx)
        started += podmans
        out += [PodmanSystem(pm, archive) for pm in podmans]
        why.update(pm_why)
        notes += [f"{k} left out: {v}" for k, v in why.items()]
        notes += [f"{d.name} (pid {d.pid}): private socket and data dir under the run's work dir, stopped by PID"
                  for d in daemons.values()]
        notes += [f"{pm.label}: daemonless, private --root/--runroot/storage.conf under the run's work dir"
                  for pm in podmans]
        return out, started
    except BaseException:
        stop(out, started)
        raise


def stop(systems_: list, started: list) -> None:
    for s in systems_:
        try:
            s.close()
        except Exception as e:  # noqa: BLE001 - cleanup goes on
            _log(f"[export] cleanup of {s.label}: {e}")
    for d in started:
        d.stop() if hasattr(d, "stop") else d.cleanup()


# ------------------------------------------------------------------ export


def _verify_archive(ctx, kind: str, path: Path, built, label: str) -> str:
    """Pull the exported archive back into a fresh layerfs store; compare its rootfs; say if diff ids match."""
    from layerfs.engine.images import ImageStore
    from layerfs.engine.pull import pull

    root = ctx.scratch("export-verify")
    try:
        with ctx.open_store(root) as store:
            images = ImageStore(store)
            pull(images, f"{kind}:{path}", "verify:1")
            note = verify_image(images, "verify:1", built.expected(), f"{label}, pulled back")
            got = json.loads(images.image("verify:1").config_raw)["rootfs"]["diff_ids"]
    finally:
        ctx.remove(root)
    same = got == list(built.diff_ids)
    return note + ("; layers byte-identical to the input (same diff ids)" if same else
                   "; layers re-tarred (diff ids differ from the input's; each matches the archive's config)")


def _export_contender(ctx, system, kind: str, built, verified: list[str]) -> Contender:
    out = ctx.scratch(f"export-{kind}")
    seq = iter(range(1_000_000))
    checked = []

    def once() -> float:
        path = out / f"{next(seq)}.tar"
        try:
            with stopwatch() as t:
                system.export(kind, path)
            if not checked:
                checked.append(True)
                verified.append(_verify_archive(ctx, kind, path, built, system.label))
            return t.elapsed
        finally:
            path.unlink(missing_ok=True)
            os.sync()

    return Contender(system.label, once, role=system.role, info=system.info())


def _tar_floor(ctx, dirs: list[Path]) -> Contender:
    out = ctx.scratch("export-tar")

    def once() -> float:
        paths = [out / f"layer{i}.tar" for i in range(len(dirs))]
        try:
            with stopwatch() as t:
                for d, p in zip(dirs, paths):
                    subprocess.run(["tar", "-cf", str(p), "-C", str(d), "."], check=True)
            return t.elapsed
        finally:
            for p in paths:
                p.unlink(missing_ok=True)
            os.sync()

    return Contender("tar -cf (layer dirs)", once, role="reference",
                     info={"command": "for each layer dir of the overlay2 store: tar -cf OUT_i -C DIR .",
                           "tar": _tool_version(["tar", "--version"])})


def export_suite(ctx):
    ctx.layerfs()
    if not ctx.drivers:
        raise SkipBenchmark("no layerfs driver opens here")
    try:
        import layerfs.engine.push  # noqa: F401
    except Exception as e:
        raise SkipBenchmark(f"layerfs.engine cannot be imported: {type(e).__name__}: {e}") from e
    built = bench_image.for_run(ctx, log=_log)
    archive = built.docker_archive
    notes = [f"image: {built.meta['description']}", CACHE_NOTE]
    systems_, started = systems(ctx, archive, notes)
    try:
        for s in systems_:
            s.load()
        os.sync()
        floor = None
        if ctx.peer_wanted("tar"):
            first = next((s for s in systems_ if isinstance(s, LayerfsSystem)
                          and s.driver == "overlay2"), None)
            dirs = _layer_dirs(first.store, first.images.image(NAME).chain) if first else None
            if dirs:
                floor = _tar_floor(ctx, dirs)
            else:
                notes.append("tar -cf floor left out: no overlay2 store with plain layer directories")
        layerfs_notes = [("layerfs: the image came from a docker-archive, so the store kept no blobs: push "
                          "re-exports each layer from its directory and hashes it (`--compress none`); `docker save` "
                          "and `podman save` rebuild the original tar bytes from the layer dirs (tar-split), "
                          "`ctr image export` copies the blobs it kept at import")]
        for kind, ref_label, what in (
                ("docker-archive", "docker overlay2", "docker save / podman save"),
                ("oci-archive", "ctr (overlayfs)", "ctr image export / podman save --format oci-archive")):
            bnotes = notes + layerfs_notes   # each exporter's verification is added as it is made
            conts = [_export_contender(ctx, s, kind, built, bnotes) for s in systems_
                     if not (kind == "docker-archive" and isinstance(s, CtrSystem))
                     and not (kind == "oci-archive" and isinstance(s, DockerSystem))]
            if floor is not None:
                conts.append(floor)
            names = [c.name for c in conts]
            yield Benchmark(
                name=f"export.{'oci' if kind == 'oci-archive' else kind}",
                description=f"write the image out to a {kind} file (vs {what})",
                contenders=conts, subject=names[0],
                reference=ref_label if ref_label in names else (floor.name if floor else None),
                runs=7, quick_runs=2, warmup=1,
                workload={"image": built.meta["description"], "format": kind,
                          "docker_archive_bytes": built.meta["docker_archive_bytes"]},
                notes=bnotes,
            )
    finally:
        stop(systems_, started)


# ------------------------------------------------------------------ gc


def _gc_contender(system) -> Contender:
    def once() -> float:
        system.load()
        os.sync()
        with stopwatch() as t:
            system.remove()
        left = system.leftovers()
        if left:
            raise AssertionError(f"{system.label}: after the removal {left}")
        return t.elapsed

    return Contender(system.label, once, role=system.role, info=system.info())


def gc_suite(ctx):
    ctx.layerfs()
    if not ctx.drivers:
        raise SkipBenchmark("no layerfs driver opens here")
    built = bench_image.for_run(ctx, log=_log)
    archive = built.docker_archive
    synth.read_through(archive)
    notes = [f"image: {built.meta['description']}", GC_NOTE,
             ("layerfs: ImageStore.remove (releases the layers: the last release deletes a layer's directory) + "
              "ImageStore.gc (unreferenced blobs, crash leftovers); the CLI row runs `layerfs rmi` and `layerfs gc`, "
              "two process starts, as docker's row runs two clients (`docker rmi`, `docker image prune -f`)"),
             "`ctr images rm --sync` returns after containerd's garbage collector removed the snapshots and blobs"]
    systems_, started = systems(ctx, archive, notes, cli_remove=True)
    try:
        conts = [_gc_contender(s) for s in systems_]
        names = [c.name for c in conts]
        yield Benchmark(
            name="gc.image",
            description="remove the image and free its layers (rmi + gc / prune)",
            contenders=conts, subject=names[0],
            reference="docker overlay2" if "docker overlay2" in names else None,
            runs=7, quick_runs=2, warmup=1,
            workload={"image": built.meta["description"]},
            notes=notes,
            between_rounds=lambda: synth.read_through(archive),
        )
    finally:
        stop(systems_, started)
