"""Storage drivers: where layer contents live and how a rootfs is assembled.

A driver knows nothing of chain ids, images or reference counts: it stores
*cache ids* (random names the graph hands it) and their parent relation, and
it mounts them.  The graph owns content addressing and bookkeeping.

Lifecycle of a layer, as the graph drives it::

    drv = registry["overlay2"](home, options)      # probe() has said it is usable
    drv.create("c0ffee", parent=None)               # an empty read-only layer
    result = drv.apply("c0ffee", None, tar_stream)  # untar into it, returns diff id
    drv.create("beef", parent="c0ffee", writable=True, size=None)   # a container
    path = drv.get("beef")                          # mount; the rootfs is at path
    ... the container writes under path ...
    changes = drv.changes("beef", "c0ffee")         # what it changed
    drv.export("beef", "c0ffee", out)               # as an OCI layer tar
    drv.put("beef")                                 # unmount
    drv.remove("beef")

``get``/``put`` are not reference counted here (the graph counts); ``get``
on a mounted id returns the existing mount.

The diff operations have a naive implementation built only on get/put that
serves any driver (as moby's NaiveDiffDriver does): mount both views and
compare, apply by untarring into a mounted snapshot.  A driver that can do
better overrides them (overlay2 reads its upper directory directly).
"""

from __future__ import annotations

import abc
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, ClassVar, Iterator, Mapping

from .. import archive
from ..changes import Change, tree_changes
from ..errors import InvalidOption

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(value: str | int, what: str) -> int:
    """Parse "10G", "512M", "1.5GiB", "4096" into bytes (binary units, as Docker's RAMInBytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise InvalidOption(f"{what}={value}: a size must be positive (e.g. 10G)")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise InvalidOption(f"{what}={value!r} is not a size; use a number with an optional unit, e.g. 10G or 512M")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if size <= 0:
        raise InvalidOption(f"{what}={value!r}: a size must be positive (e.g. 10G)")
    return size


class Driver(abc.ABC):
    """The protocol every storage driver implements (see the module docstring)."""

    name: ClassVar[str]
    priority: ClassVar[int]  # lower is tried first by driver="auto"
    options: ClassVar[dict[str, str]] = {}  # option name -> help text
    whiteout_format: ClassVar[archive.WhiteoutFormat] = archive.WhiteoutFormat.DELETE
    max_depth: ClassVar[int] = 1 << 30  # deepest chain the driver can mount
    # True when a layer can be applied before its parent is (independent
    # directories); a snapshot driver applies onto a copy of the parent.
    parallel_apply: ClassVar[bool] = False

    def __init__(self, home: Path, options: Mapping[str, str]):
        self.home = Path(home)
        self.opts = dict(options)

    @classmethod
    def validate_options(cls, options: Mapping[str, str]) -> dict[str, str]:
        """Reject unknown options up front, naming them."""
        for key in options:
            if key not in cls.options:
                known = ", ".join(sorted(cls.options)) or "none"
                raise InvalidOption(f"unknown storage option {key!r} for driver {cls.name} (known: {known})")
        return dict(options)

    @classmethod
    @abc.abstractmethod
    def probe(cls, home: Path) -> None:
        """Raise DriverUnavailable (saying why and how to fix it) when unusable at *home*."""

    @classmethod
    def has_state(cls, root: Path) -> bool:
        """True when *root* already holds this driver's layers."""
        return (root / cls.name).is_dir()

    # -- layers ------------------------------------------------------------
    @abc.abstractmethod
    def create(self, id: str, parent: str | None, *, writable: bool = False, size: int | None = None) -> None: ...

    @abc.abstractmethod
    def remove(self, id: str) -> None:
        """Remove the layer and its mount if any; a missing id is not an error."""

    @abc.abstractmethod
    def get(self, id: str, *, readonly: bool = False) -> Path:
        """Mount the layer's view (idempotent) and return where it is."""

    @abc.abstractmethod
    def put(self, id: str) -> None:
        """Unmount (a no-op when not mounted)."""

    @abc.abstractmethod
    def is_mounted(self, id: str) -> bool: ...

    @abc.abstractmethod
    def mount_path(self, id: str) -> Path:
        """Where get() mounts *id* (mounted or not)."""

    @abc.abstractmethod
    def exists(self, id: str) -> bool: ...

    @abc.abstractmethod
    def ids(self) -> set[str]:
        """Every cache id the driver holds state for."""

    def status(self) -> dict:
        return {}

    def cleanup(self, repair: bool = True, deep: bool = False) -> list[str]:
        """Find (and with *repair*, finish) removals a crash interrupted; describe what was found.

        Opening a store runs the cheap part; *deep* (gc, check) looks at everything.
        """
        return []

    def close(self) -> None:
        """Release what this instance holds; mounts stay."""

    # -- diff (naive versions built on get/put) ------------------------------
    def apply(self, id: str, parent: str | None, src: BinaryIO, *, isolate: bool = False) -> archive.ApplyResult:
        """Unpack layer tar *src* into layer *id*.  *isolate*: write the entries from a
        worker process (the graph asks when it applies big layers side by side)."""
        path = self.get(id)
        try:
            return archive.apply_tar(src, path, self.whiteout_format, isolate=isolate)
        finally:
            self.put(id)

    def finish_apply(self, id: str, result: archive.ApplyResult) -> None:
        """Called after apply() once every parent layer is complete."""

    def changes(self, id: str, parent: str | None) -> list[Change]:
        with self._views(id, parent) as (new, old):
            return tree_changes(str(new), None if old is None else str(old))

    def export(self, id: str, parent: str | None, out: BinaryIO) -> str:
        with self._views(id, parent) as (new, old):
            found = tree_changes(str(new), None if old is None else str(old))
            exporter = archive.TarExporter(out)
            archive.export_tree_entries(exporter, str(new), ((c.kind, c.path[1:]) for c in found))
            return exporter.close()

    @contextmanager
    def _views(self, id: str, parent: str | None) -> Iterator[tuple[Path, Path | None]]:
        """The container's view and its parent's read-only view, mounted for the block.

        Mounts that were already there (a user's) are left as they were.
        """
        was_mounted = self.is_mounted(id)
        parent_was_mounted = parent is not None and self.is_mounted(parent)
        new = self.get(id)
        try:
            old = None if parent is None else self.get(parent, readonly=True)
            try:
                yield new, old
            finally:
                if parent is not None and not parent_was_mounted:
                    self.put(parent)
        finally:
            if not was_mounted:
                self.put(id)


class DirectoryLayers:
    """Mixin for drivers that keep each layer as ``<home>/<id>/`` with ``diff/`` and ``merged/``.

    *reserved_names* are the driver's own entries of home that are no layer.
    """

    home: Path
    reserved_names: ClassVar[frozenset[str]] = frozenset()

    def _dir(self, id: str) -> Path:
        return self.home / id

    def exists(self, id: str) -> bool:
        return (self._dir(id) / "diff").is_dir()

    def ids(self) -> set[str]:
        try:
            names = os.listdir(self.home)
        except FileNotFoundError:
            return set()
        return {
            n for n in names if n not in self.reserved_names and not n.startswith(".") and (self.home / n).is_dir()
        }

    def mount_path(self, id: str) -> Path:
        return self._dir(id) / "merged"

    whiteout_format: archive.WhiteoutFormat

    # Native apply: a layer's diff/ is a plain directory, no mount needed.
    def apply(self, id: str, parent: str | None, src: BinaryIO, *, isolate: bool = False) -> archive.ApplyResult:
        return archive.apply_tar(src, self._dir(id) / "diff", self.whiteout_format, isolate=isolate)


def registry() -> dict[str, type[Driver]]:
    """Driver classes by name, in the order driver="auto" tries them."""
    from .aufs import AufsDriver
    from .overlay2 import Overlay2Driver

    found: list[type[Driver]] = [Overlay2Driver, AufsDriver]
    from .devicemapper import DevicemapperDriver

    found.append(DevicemapperDriver)
    return {cls.name: cls for cls in sorted(found, key=lambda c: c.priority)}


def remove_tree(path: str) -> None:
    """rm -rf that tolerates a missing path."""
    import shutil

    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        os.unlink(path)
