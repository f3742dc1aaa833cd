"""The layer graph: content-addressed image layers and writable containers.

A store lives in one root directory and keeps its layers on one storage
driver.  Image layers are read-only and addressed by content; containers are
writable layers on top of an image layer, addressed by name.  A worked
example of the whole lifecycle::

    import layerfs
    with layerfs.open_store("/var/lib/layerfs") as store:
        base = store.register("rootfs.tar.gz")               # diff id = sha256 of the tar
        app = store.register("app.tar", parent=base.chain_id) # chain id = sha256("<parent> <diff>")
        store.create_container("web", app.chain_id)           # a writable layer on top
        root = store.mount("web")                              # a pathlib.Path: the rootfs
        (root / "etc/motd").write_text("hello\\n")
        store.changes("web")    # [Change('/etc', 'C'), Change('/etc/motd', 'A')]
        store.unmount("web")
        snap = store.commit("web")                            # the changes as a new image layer
        store.remove_container("web")
        store.release(snap.chain_id); store.release(app.chain_id); store.release(base.chain_id)

Reference counting: ``register`` (and ``commit``) give the caller one
reference; registering the same content on the same parent again returns the
same layer with one more reference.  ``release`` drops one; the last one can
only be dropped when no child layer and no container uses the layer, and
then the layer is deleted.  ``mount``/``unmount`` are counted too (across
processes, until the next reboot).

Crash safety comes from ordering: driver state for a new cache id is created
under an intent (see ``_intents``) before the metadata row that makes it
visible; deletions remove the row first and the directory after.  Opening a
store repairs what a killed process left behind; ``gc`` and ``check`` also
find leftovers that have no intent.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Sequence

from . import archive, digest
from ._intents import Intents
from .changes import Change
from .drivers import Driver, parse_size, registry
from .errors import AlreadyExists, DigestMismatch, DriverUnavailable, InUse, InvalidLayer, InvalidOption, NotFound
from .metadata import Metadata

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_HEX_RE = re.compile(r"^(sha256:)?[0-9a-f]{4,64}$")
# Layers at least this big (as stored) are applied by a worker process when
# several are applied side by side; smaller ones are not worth its start-up.
ISOLATE_MIN_BYTES = 8 << 20


@dataclass(frozen=True)
class Layer:
    chain_id: str
    diff_id: str
    parent: str | None
    size: int
    refs: int
    depth: int  # 1 for a base layer
    cache_id: str
    created: float


@dataclass(frozen=True)
class Container:
    name: str
    parent: str | None
    size: int | None  # size limit in bytes, None for unlimited
    cache_id: str
    created: float
    mounts: int  # current mount reference count


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


class LayerStore:
    """A layer graph in *root* on one storage driver (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, driver: str = "auto", options: Mapping[str, str] | None = None):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.db = Metadata(self.root / "layerfs.db")
        try:
            self.driver = self._open_driver(driver, dict(options or {}))
            self.intents = Intents(self.root / "intents")
            (self.root / "tmp").mkdir(exist_ok=True)
            with self._store_lock():
                self._recover()
        except BaseException:
            self.db.close()
            os.close(self._lock_fd)
            raise

    # -- opening ----------------------------------------------------------------
    def _open_driver(self, name: str, options: dict[str, str]) -> Driver:
        drivers = registry()
        if name != "auto" and name not in drivers:
            raise DriverUnavailable(f"unknown storage driver {name!r}; available: {', '.join(drivers)}")
        recorded = self.db.get_meta("driver")
        if recorded is not None:
            if recorded not in drivers:
                raise DriverUnavailable(f"store {self.root} uses driver {recorded!r}, which this layerfs does not have")
            if name not in ("auto", recorded):
                raise InvalidOption(
                    f"store {self.root} holds {recorded} layers; open it with --driver {recorded} or use another --root"
                )
            candidates = [drivers[recorded]]
        elif name != "auto":
            candidates = [drivers[name]]
        else:
            # A root with a driver's directory but no record (an old or damaged store) keeps that driver.
            prior = [cls for cls in drivers.values() if cls.has_state(self.root)]
            candidates = prior or list(drivers.values())
        reasons = []
        for cls in candidates:
            home = self.root / cls.name
            existed = home.exists()
            try:
                opts = cls.validate_options(options)
                cls.probe(home)
                instance = cls(home, opts)
            except DriverUnavailable as exc:
                if not existed:
                    _remove_tree(home)
                reasons.append(str(exc))
                continue
            if recorded is None:
                with self.db.write() as db:
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('driver', ?)", (cls.name,))
            return instance
        if len(reasons) == 1:
            raise DriverUnavailable(reasons[0])
        raise DriverUnavailable(f"no usable storage driver for {self.root}: " + "; ".join(reasons))

    @contextmanager
    def _store_lock(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _recover(self) -> None:
        boot = _boot_id()
        if self.db.get_meta("boot_id") != boot:
            # Mounts do not survive a reboot; neither do their counts.
            with self.db.write() as db:
                db.execute("DELETE FROM mounts")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('boot_id', ?)", (boot,))
        self.intents.reap(self._repair_cache_id)
        self.driver.cleanup(repair=True)

    def _repair_cache_id(self, cache_id: str) -> None:
        if not self._cache_id_known(cache_id):
            self.driver.remove(cache_id)

    def _cache_id_known(self, cache_id: str) -> bool:
        return (
            self.db.one("SELECT 1 FROM layers WHERE cache_id = ?", (cache_id,)) is not None
            or self.db.one("SELECT 1 FROM containers WHERE cache_id = ?", (cache_id,)) is not None
        )

    def close(self) -> None:
        if self._lock_fd >= 0:
            self.driver.close()
            self.db.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> "LayerStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- lookups -----------------------------------------------------------------
    @staticmethod
    def _layer(row) -> Layer:
        return Layer(row["chain_id"], row["diff_id"], row["parent"], row["size"], row["refs"], row["depth"], row["cache_id"], row["created"])

    def _container(self, row) -> Container:
        mounted = self.db.one("SELECT refs FROM mounts WHERE cache_id = ?", (row["cache_id"],))
        return Container(row["name"], row["parent"], row["size"], row["cache_id"], row["created"], mounted["refs"] if mounted else 0)

    def _layer_row(self, chain_id: str):
        full = self._expand_chain_id(chain_id)
        row = self.db.one("SELECT * FROM layers WHERE chain_id = ?", (full,))
        if row is None:
            raise NotFound(f"layer {chain_id} does not exist; see `layerfs layer ls`")
        return row

    def _expand_chain_id(self, ref: str) -> str:
        """A full chain id from a full id or a unique hex prefix (as users type them)."""
        if digest.is_digest(ref):
            return ref
        if not isinstance(ref, str) or not _HEX_RE.match(ref):
            raise NotFound(f"layer {ref!r} does not exist: a layer is named by its chain id (sha256:<hex>)")
        hexpart = ref.split(":", 1)[-1]
        rows = self.db.query("SELECT chain_id FROM layers WHERE chain_id LIKE ?", (f"sha256:{hexpart}%",))
        if len(rows) > 1:
            raise InvalidOption(f"layer id {ref!r} is ambiguous ({len(rows)} layers match); give more digits")
        if not rows:
            raise NotFound(f"layer {ref} does not exist; see `layerfs layer ls`")
        return rows[0]["chain_id"]

    def layer(self, chain_id: str) -> Layer:
        return self._layer(self._layer_row(chain_id))

    def layers(self) -> list[Layer]:
        return [self._layer(r) for r in self.db.query("SELECT * FROM layers ORDER BY depth, created, chain_id")]

    def container(self, name: str) -> Container:
        row = self.db.one("SELECT * FROM containers WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"container {name!r} does not exist; see `layerfs ps`")
        return self._container(row)

    def containers(self) -> list[Container]:
        return [self._container(r) for r in self.db.query("SELECT * FROM containers ORDER BY created, name")]

    def _resolve(self, ref: str) -> tuple[str, str, bool]:
        """(kind, cache_id, readonly) for a container name or a layer chain id."""
        row = self.db.one("SELECT cache_id FROM containers WHERE name = ?", (ref,))
        if row is not None:
            return "container", row["cache_id"], False
        try:
            layer = self._layer_row(ref)
        except NotFound:
            raise NotFound(f"no container or layer named {ref!r}; see `layerfs ps` and `layerfs layer ls`") from None
        return "layer", layer["cache_id"], True

    # -- adding layers -------------------------------------------------------------
    def register(self, src, parent: str | None = None, expected_diff_id: str | None = None) -> Layer:
        """Apply a layer tar (path or binary file object; plain, gzip or zstd) on *parent*."""
        return self.register_chain([(src, expected_diff_id)], parent=parent)[0]

    def register_chain(
        self, sources: Sequence[tuple[object, str | None]], parent: str | None = None, parallel: bool = True
    ) -> list[Layer]:
        """Register layers stacked in order on *parent*; one reference on each.

        *sources* are (src, expected_diff_id) pairs; src is a path, a binary
        file object or a callable returning one.  Layers already stored
        (known by expected diff id) are not read.  With every diff id known
        and a driver whose layers are independent directories, the tars are
        applied in parallel; nothing becomes visible until all of them are
        applied and verified, and then all at once.  Big layers (a path's
        size, or a ``size_hint`` attribute on the callable or file object, of
        at least ISOLATE_MIN_BYTES) other than the largest are then written by
        worker processes, so they use every core.
        """
        for _, expected in sources:
            if expected is not None and not digest.is_digest(expected):
                raise InvalidOption(f"expected diff id {expected!r} is not a sha256:<64 hex> digest")
        if not sources:
            return []
        if len(sources) > 1 and any(expected is None for _, expected in sources):
            # Without diff ids a later layer's parent is known only after the
            # earlier one is applied: go one by one.
            out: list[Layer] = []
            for src, expected in sources:
                out.append(self.register_chain([(src, expected)], parent=parent)[0])
                parent = out[-1].chain_id
            return out
        parent_row = self._layer_row(parent) if parent is not None else None
        for _attempt in range(5):
            result = self._add_layers(parent_row, sources, parallel)
            if result is not None:
                return result
        raise InUse("the layer chain kept changing under concurrent registrations; try again")

    def retain(self, chain_id: str) -> Layer:
        """Take one more reference on a layer (an engine recording another image on it)."""
        layer = self._take_ref(self._expand_chain_id(chain_id))
        if layer is None:
            raise NotFound(f"layer {chain_id} does not exist; see `layerfs layer ls`")
        return layer

    def _take_ref(self, chain_id: str) -> Layer | None:
        with self.db.write() as db:
            row = db.execute("SELECT * FROM layers WHERE chain_id = ?", (chain_id,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE layers SET refs = refs + 1 WHERE chain_id = ?", (chain_id,))
        return self.layer(chain_id)

    def _add_layers(self, parent_row, sources, parallel: bool) -> list[Layer] | None:
        """One attempt at register_chain; None when another process raced us (retry)."""
        depth0 = parent_row["depth"] if parent_row else 0
        if depth0 + len(sources) > self.driver.max_depth:
            raise InvalidLayer(
                f"layer chain on {parent_row['chain_id'] if parent_row else 'scratch'} would be "
                f"{depth0 + len(sources)} layers deep; {self.driver.name} mounts at most {self.driver.max_depth}"
            )
        # Plan: a known prefix is reused; everything after it is new.
        chain = parent_row["chain_id"] if parent_row else None
        parent_cache = parent_row["cache_id"] if parent_row else None
        reused = 0
        for _, expected in sources:
            if expected is None:
                break
            row = self.db.one("SELECT cache_id FROM layers WHERE chain_id = ?", (digest.chain_id(chain, expected),))
            if row is None:
                break
            chain, parent_cache = digest.chain_id(chain, expected), row["cache_id"]
            reused += 1
        plan = [(src, expected, secrets.token_hex(16)) for src, expected in sources[reused:]]
        with ExitStack() as intents:
            for _, _, cache_id in plan:
                intents.enter_context(self.intents.hold(cache_id))
            created: list[str] = []
            try:
                results = self._fill_layers(plan, parent_cache, parallel, created)
                chains, rows = self._chain_rows(sources[:reused], plan, results, parent_row)
                with self.db.write() as db:
                    if parent_row and not db.execute("SELECT 1 FROM layers WHERE chain_id = ?", (parent_row["chain_id"],)).fetchone():
                        raise NotFound(f"parent layer {parent_row['chain_id']} was removed while its children were being added")
                    present = [db.execute("SELECT 1 FROM layers WHERE chain_id = ?", (c,)).fetchone() is not None for c in chains]
                    if not all(present[:reused]) or _stored_then_missing(present[reused:]):
                        # Another process stored (or removed) part of this chain
                        # meanwhile, so a new layer sits on a copy that will not be
                        # kept. Start over with a fresh plan.
                        raise _Raced()
                    for chain_id, row, there in zip(chains, rows, present):
                        if there:
                            db.execute("UPDATE layers SET refs = refs + 1 WHERE chain_id = ?", (chain_id,))
                        else:
                            db.execute("INSERT INTO layers VALUES (?, ?, ?, ?, ?, 1, ?, ?)", row)
            except _Raced:
                for cache_id in created:
                    self.driver.remove(cache_id)
                return None
            except BaseException:
                for cache_id in created:
                    self.driver.remove(cache_id)
                raise
            for (_, _, cache_id), there in zip(plan, present[reused:]):
                if there:
                    self.driver.remove(cache_id)  # the same content is already stored: keep one copy
        return [self.layer(c) for c in chains]

    def _fill_layers(self, plan, parent_cache: str | None, parallel: bool, created: list[str]) -> list[archive.ApplyResult]:
        pcache = parent_cache
        parents = []
        for _, _, cache_id in plan:
            self.driver.create(cache_id, pcache)
            created.append(cache_id)
            parents.append(pcache)
            pcache = cache_id

        def fill(i: int) -> archive.ApplyResult:
            src, expected, cache_id = plan[i]
            # Why a worker process per big layer: threads applying side by
            # side share one interpreter lock, so one core (see _applyproc).
            isolate = side_by_side and i in isolated
            result = _apply_source(self.driver, cache_id, parents[i], src, isolate=isolate)
            if expected is not None and result.diff_id != expected:
                raise DigestMismatch(f"layer content has diff id {result.diff_id}, expected {expected}; nothing was stored")
            return result

        side_by_side = parallel and self.driver.parallel_apply and len(plan) > 1
        isolated = _layers_to_isolate([_source_size(src) for src, _, _ in plan]) if side_by_side else set()
        if side_by_side:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(len(plan), 4), thread_name_prefix="layerfs-layer") as pool:
                futures = [pool.submit(fill, i) for i in range(len(plan))]
                results = [f.result() for f in futures]
        else:
            results = [fill(i) for i in range(len(plan))]
        for (_, _, cache_id), result in zip(plan, results):
            self.driver.finish_apply(cache_id, result)  # parents are complete now
        return results

    def _chain_rows(self, reused_sources, plan, results, parent_row):
        chains, rows = [], []
        chain = parent_row["chain_id"] if parent_row else None
        depth = parent_row["depth"] if parent_row else 0
        for _, expected in reused_sources:
            chain = digest.chain_id(chain, expected)
            depth += 1
            chains.append(chain)
            rows.append(None)
        now = time.time()
        for (_, _, cache_id), result in zip(plan, results):
            parent_chain, chain = chain, digest.chain_id(chain, result.diff_id)
            depth += 1
            chains.append(chain)
            rows.append((chain, result.diff_id, parent_chain, cache_id, result.size, depth, now))
        return chains, rows

    def release(self, chain_id: str) -> None:
        """Drop one reference; the last one deletes the layer (InUse while it has dependents)."""
        row = self._layer_row(chain_id)
        chain, cache_id = row["chain_id"], row["cache_id"]
        with self.intents.hold(cache_id):
            with self.db.write() as db:
                row = db.execute("SELECT refs FROM layers WHERE chain_id = ?", (chain,)).fetchone()
                if row is None:
                    raise NotFound(f"layer {chain_id} does not exist; see `layerfs layer ls`")
                if row["refs"] > 1:
                    db.execute("UPDATE layers SET refs = refs - 1 WHERE chain_id = ?", (chain,))
                    return
                self._check_unused(db, chain, cache_id)
                db.execute("DELETE FROM layers WHERE chain_id = ?", (chain,))
            self.driver.remove(cache_id)

    def _check_unused(self, db, chain: str, cache_id: str) -> None:
        children = db.execute("SELECT COUNT(*) FROM layers WHERE parent = ?", (chain,)).fetchone()[0]
        ctrs = [r["name"] for r in db.execute("SELECT name FROM containers WHERE parent = ?", (chain,))]
        short = digest.short(chain)
        if children:
            raise InUse(f"layer {short} has {children} child layer(s); release them first")
        if ctrs:
            raise InUse(f"layer {short} is the parent of container(s) {', '.join(sorted(ctrs))}; remove them first")
        mounted = db.execute("SELECT refs FROM mounts WHERE cache_id = ?", (cache_id,)).fetchone()
        if mounted and mounted["refs"] > 0:
            raise InUse(f"layer {short} is mounted read-only; unmount it first (layerfs umount {short})")

    # -- containers ------------------------------------------------------------------
    def create_container(self, name: str, parent: str | None, size: int | str | None = None) -> Container:
        """A writable layer named *name* on *parent* (a chain id, or None for an empty rootfs)."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidOption(f"container name {name!r} is invalid; use letters, digits, '_', '.', '-' (max 128)")
        size_bytes = None if size is None else parse_size(size, "size")
        parent_row = self._layer_row(parent) if parent is not None else None
        if self.db.one("SELECT 1 FROM containers WHERE name = ?", (name,)):
            raise AlreadyExists(f"container {name!r} already exists; pick another name or remove it (layerfs rm {name})")
        cache_id = secrets.token_hex(16)
        with self.intents.hold(cache_id):
            try:
                self.driver.create(cache_id, parent_row["cache_id"] if parent_row else None, writable=True, size=size_bytes)
                with self.db.write() as db:
                    if db.execute("SELECT 1 FROM containers WHERE name = ?", (name,)).fetchone():
                        raise AlreadyExists(f"container {name!r} already exists; pick another name")
                    if parent_row and not db.execute("SELECT 1 FROM layers WHERE chain_id = ?", (parent_row["chain_id"],)).fetchone():
                        raise NotFound(f"layer {parent} was removed while the container was being created")
                    db.execute(
                        "INSERT INTO containers VALUES (?, ?, ?, ?, ?)",
                        (name, parent_row["chain_id"] if parent_row else None, cache_id, size_bytes, time.time()),
                    )
            except BaseException:
                self.driver.remove(cache_id)
                raise
        return self.container(name)

    def remove_container(self, name: str, force: bool = False) -> None:
        """Delete a container and its writable layer (InUse while mounted, unless *force*)."""
        ctr = self.container(name)
        with self.intents.hold(ctr.cache_id):
            with self.db.write() as db:
                mounted = db.execute("SELECT refs FROM mounts WHERE cache_id = ?", (ctr.cache_id,)).fetchone()
                if mounted and mounted["refs"] > 0:
                    if not force:
                        raise InUse(f"container {name!r} is mounted; unmount it first (layerfs umount {name})")
                    self.driver.put(ctr.cache_id)
                    db.execute("DELETE FROM mounts WHERE cache_id = ?", (ctr.cache_id,))
                if not db.execute("DELETE FROM containers WHERE name = ?", (name,)).rowcount:
                    raise NotFound(f"container {name!r} does not exist; see `layerfs ps`")
            self.driver.remove(ctr.cache_id)

    # -- mounts ------------------------------------------------------------------------
    def mount(self, ref: str) -> Path:
        """Mount a container (read-write) or a layer (read-only view); counted."""
        _, cache_id, readonly = self._resolve(ref)
        with self.db.write() as db:
            path = self.driver.get(cache_id, readonly=readonly)
            db.execute(
                "INSERT INTO mounts VALUES (?, 1) ON CONFLICT(cache_id) DO UPDATE SET refs = refs + 1", (cache_id,)
            )
        return path

    def mount_path(self, ref: str) -> Path:
        """Where *ref* is (or would be) mounted."""
        return self.driver.mount_path(self._resolve(ref)[1])

    def unmount(self, ref: str) -> None:
        _, cache_id, _ = self._resolve(ref)
        with self.db.write() as db:
            row = db.execute("SELECT refs FROM mounts WHERE cache_id = ?", (cache_id,)).fetchone()
            if row is None or row["refs"] <= 0:
                if self.driver.is_mounted(cache_id):
                    self.driver.put(cache_id)  # a mount nobody counted (a killed mounter): just undo it
                    return
                raise NotFound(f"{ref} is not mounted")
            if row["refs"] == 1:
                self.driver.put(cache_id)
                db.execute("DELETE FROM mounts WHERE cache_id = ?", (cache_id,))
            else:
                db.execute("UPDATE mounts SET refs = refs - 1 WHERE cache_id = ?", (cache_id,))

    # -- diffs ---------------------------------------------------------------------------
    def _container_caches(self, name: str) -> tuple[Container, str | None]:
        ctr = self.container(name)
        parent_cache = self.layer(ctr.parent).cache_id if ctr.parent else None
        return ctr, parent_cache

    def changes(self, name: str) -> list[Change]:
        ctr, parent_cache = self._container_caches(name)
        return self.driver.changes(ctr.cache_id, parent_cache)

    def export_diff(self, name: str, fileobj: BinaryIO) -> str:
        """Write the container's changes as an uncompressed OCI layer tar; returns its diff id."""
        ctr, parent_cache = self._container_caches(name)
        return self.driver.export(ctr.cache_id, parent_cache, fileobj)

    def export_layer(self, chain_id: str, fileobj: BinaryIO) -> str:
        """Write an image layer's own content as an uncompressed OCI layer tar; returns its diff id.

        The bytes are a deterministic re-export: they equal the registered
        tar only when that tar was itself written by layerfs.
        """
        row = self._layer_row(chain_id)
        parent_cache = self._layer_row(row["parent"])["cache_id"] if row["parent"] else None
        return self.driver.export(row["cache_id"], parent_cache, fileobj)

    def commit(self, name: str) -> Layer:
        """The container's changes become a new layer on the container's parent (one reference)."""
        ctr, parent_cache = self._container_caches(name)
        with tempfile.TemporaryFile(dir=self.root / "tmp") as tmp:
            diff_id = self.driver.export(ctr.cache_id, parent_cache, tmp)
            tmp.seek(0)
            return self.register(tmp, parent=ctr.parent, expected_diff_id=diff_id)

    # -- maintenance ----------------------------------------------------------------------
    def status(self) -> dict:
        counts = self.db.one(
            "SELECT (SELECT COUNT(*) FROM layers) AS layers, (SELECT COUNT(*) FROM containers) AS containers, "
            "(SELECT COUNT(*) FROM mounts WHERE refs > 0) AS mounted"
        )
        return {
            "driver": self.driver.name,
            "root": str(self.root),
            "layers": counts["layers"],
            "containers": counts["containers"],
            "mounted": counts["mounted"],
            "probes": self.driver.status(),
        }

    def gc(self) -> dict:
        """Free what nothing references: leftovers of crashes, orphaned directories, stale counts."""
        with self._store_lock():
            problems = self._scan(repair=True)
        return {"repaired": problems}

    def check(self, repair: bool = False) -> list[str]:
        """Problems found in the store (none when healthy); *repair* fixes them."""
        with self._store_lock():
            return self._scan(repair)

    def _scan(self, repair: bool) -> list[str]:
        problems: list[str] = []
        if repair:
            reaped = self.intents.reap(self._repair_cache_id)
        else:
            reaped = self.intents.stale()
        problems += [f"interrupted operation on cache id {c}" for c in reaped]
        # Order matters: driver ids, then live intents, then metadata (see _intents).
        on_disk = self.driver.ids()
        live = self.intents.active()
        known = {r["cache_id"] for r in self.db.query("SELECT cache_id FROM layers UNION ALL SELECT cache_id FROM containers")}
        for cache_id in sorted(on_disk - live - known):
            problems.append(f"orphaned {self.driver.name} directory {cache_id} (no layer or container uses it)")
            if repair:
                self.driver.remove(cache_id)
        for row in self.db.query("SELECT chain_id, cache_id FROM layers"):
            if row["cache_id"] not in on_disk:
                problems.append(f"layer {digest.short(row['chain_id'])}: its {self.driver.name} directory is missing")
        for row in self.db.query("SELECT name, cache_id FROM containers"):
            if row["cache_id"] not in on_disk:
                problems.append(f"container {row['name']}: its {self.driver.name} directory is missing")
        for row in self.db.query("SELECT cache_id, refs FROM mounts"):
            if row["refs"] > 0 and not self.driver.is_mounted(row["cache_id"]):
                problems.append(f"mount count {row['refs']} for {row['cache_id']} but it is not mounted")
                if repair:
                    with self.db.write() as db:
                        db.execute("DELETE FROM mounts WHERE cache_id = ?", (row["cache_id"],))
        counted = {r["cache_id"] for r in self.db.query("SELECT cache_id FROM mounts WHERE refs > 0")}
        for cache_id in sorted((on_disk & known) - counted):
            if self.driver.is_mounted(cache_id):
                problems.append(f"{cache_id} is mounted but no mount is counted (a mounter was killed)")
                if repair:
                    self.driver.put(cache_id)
        for row in self.db.query(
            "SELECT chain_id, cache_id FROM layers l WHERE refs <= 0 "
            "AND NOT EXISTS (SELECT 1 FROM layers c WHERE c.parent = l.chain_id) "
            "AND NOT EXISTS (SELECT 1 FROM containers c WHERE c.parent = l.chain_id)"
        ):
            problems.append(f"layer {digest.short(row['chain_id'])} has no references")
            if repair:
                with self.intents.hold(row["cache_id"]):
                    with self.db.write() as db:
                        db.execute("DELETE FROM layers WHERE chain_id = ?", (row["chain_id"],))
                    self.driver.remove(row["cache_id"])
        problems += self.driver.cleanup(repair, deep=True)
        return problems


class _Raced(Exception):
    """Another process changed the chain being registered (internal: retried)."""


def _stored_then_missing(present: list[bool]) -> bool:
    """True when a layer already stored is followed by one that is not (pure)."""
    seen = False
    for there in present:
        if there:
            seen = True
        elif seen:
            return True
    return False


def _source_size(src) -> int:
    """Bytes of a layer source as stored (0 when unknown): a path's size, or a ``size_hint``."""
    if isinstance(src, (str, os.PathLike)):
        try:
            return os.stat(src).st_size
        except OSError:
            return 0
    return getattr(src, "size_hint", 0) or 0


def _layers_to_isolate(sizes: list[int]) -> set[int]:
    """Which of layers applied side by side get a worker process (pure).

    Every layer of ISOLATE_MIN_BYTES or more except the largest: that one is
    applied by this process, whose interpreter the other layers leave free
    (they only feed their workers, in C code that drops the lock), so it
    pays neither a worker's start nor a pipe copy of the biggest stream.
    """
    big = [i for i, size in enumerate(sizes) if size >= ISOLATE_MIN_BYTES]
    if big:
        big.remove(max(big, key=lambda i: (sizes[i], -i)))
    return set(big)


def _apply_source(driver: Driver, cache_id: str, parent_cache: str | None, src, isolate: bool = False) -> archive.ApplyResult:
    if callable(src) and not hasattr(src, "read"):
        src = src()
    if isinstance(src, (str, os.PathLike)):
        try:
            f = open(src, "rb")
        except FileNotFoundError:
            raise NotFound(f"layer file {os.fspath(src)} does not exist") from None
        except IsADirectoryError:
            raise InvalidOption(f"layer file {os.fspath(src)} is a directory; give a tar file") from None
        with f:
            return driver.apply(cache_id, parent_cache, f, isolate=isolate)
    if not hasattr(src, "read"):
        raise InvalidOption(f"a layer source is a path or a binary file object, not {type(src).__name__}")
    return driver.apply(cache_id, parent_cache, src, isolate=isolate)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def open_store(root: str | os.PathLike, driver: str = "auto", options: Mapping[str, str] | None = None) -> LayerStore:
    """Open (creating if needed) the store at *root*.  Also a context manager."""
    return LayerStore(root, driver=driver, options=options)
