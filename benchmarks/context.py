"""What a suite gets: where to put things, how big to make them, how to open a store."""

from __future__ import annotations

import dataclasses
import itertools
import time
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import mounts


@dataclass
class RunContext:
    out_dir: Path                 # results.json / results.md
    cache_dir: Path               # generated inputs, kept across runs
    work_dir: Path                # stores and scratch trees of this run, removed at the end
    quick: bool = False
    driver: str = "auto"
    options: dict[str, str] | None = None
    drivers: list[str] = field(default_factory=list)          # usable layerfs drivers of this run
    drivers_skipped: dict[str, str] = field(default_factory=dict)   # driver -> why it cannot run here
    peers: set[str] | None = None                             # None: every peer installed
    image: str = "synthetic"                                  # pull/snapshot input: synthetic | realistic
    curves: set[str] | None = None                            # scaling curves to run (None: all)
    _counter: Any = field(default_factory=lambda: itertools.count())
    _deferred: list = field(default_factory=list)             # paths remove_later() keeps until the suite ends
    settle_s: float = 0.0                                     # --settle: quiet time after a peer frees files
    _freed_at: list = field(default_factory=lambda: [0.0])    # monotonic time a peer last freed files (shared)

    def scratch(self, stem: str) -> Path:
        """A new, empty directory under the work dir (same filesystem as every store)."""
        p = self.work_dir / f"{stem}-{next(self._counter)}"
        p.mkdir(parents=True)
        return p

    def remove(self, path: Path) -> None:
        mounts.safe_rmtree(path)

    def remove_later(self, path: Path) -> None:
        """Remove *path* (a round's output, nothing mounted) when the suite ends, not now.

        Why: on ext4 without a journal (these machines) the inode allocator
        skips inodes freed in the last 60 s (300 s while their table block is
        dirty), testing each in turn, so a round that creates files right
        after the previous round removed thousands pays that scan on every
        create.  Real users do not free and refill a tree every few seconds;
        a daemon's data root (docker, podman) keeps its files in other block
        groups.  Removing our own rounds' outputs at the end keeps every
        contender we control out of it alike.
        """
        self._deferred.append(path)

    def freed(self) -> None:
        """A contender just removed files (a peer's image) that remove_later() cannot defer."""
        self._freed_at[0] = time.monotonic()

    def settle(self) -> None:
        """Before a timed round: wait until --settle seconds have passed since freed() (untimed)."""
        wait = self._freed_at[0] + self.settle_s - time.monotonic()
        if self.settle_s > 0 and wait > 0:
            time.sleep(wait)

    def remove_deferred(self) -> None:
        while self._deferred:
            self.remove(self._deferred.pop())

    def layerfs(self):
        """The layerfs module, or SkipBenchmark when it cannot be imported."""
        from .runner import SkipBenchmark
        try:
            import layerfs
        except Exception as e:  # noqa: BLE001
            raise SkipBenchmark(f"layerfs cannot be imported: {type(e).__name__}: {e}") from e
        if not hasattr(layerfs, "open_store"):
            raise SkipBenchmark("layerfs.open_store is not there yet (library not landed)")
        return layerfs

    def open_store(self, root: Path):
        return self.layerfs().open_store(str(root), driver=self.driver, options=self.options)

    def cli(self) -> list[str]:
        """Command prefix for the layerfs CLI (console script, else ``python -m layerfs``)."""
        script = Path(sys.executable).with_name("layerfs")
        if script.exists() and os.access(script, os.X_OK):
            base = [str(script)]
        elif shutil.which("layerfs"):
            base = [shutil.which("layerfs")]
        else:
            base = [sys.executable, "-m", "layerfs"]
        if self.driver != "auto":
            base += ["--driver", self.driver]
        for k, v in (self.options or {}).items():
            base += ["--storage-opt", f"{k}={v}"]
        return base

    def for_driver(self, driver: str) -> "RunContext":
        """The same context with another layerfs driver (scratch names stay unique)."""
        return dataclasses.replace(self, driver=driver)

    def peer_wanted(self, peer: str) -> bool:
        return self.peers is None or peer in self.peers

    def pick(self, full, quick):
        return quick if self.quick else full


def discard_store(store) -> None:
    """Remove every container of a benchmark store (best effort) and close it."""
    try:
        for c in store.containers():
            store.remove_container(c.name, force=True)
    except Exception:  # noqa: BLE001 -- cleanup must go on to close the store
        pass
    store.close()
