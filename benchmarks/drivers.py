"""Which layerfs drivers to benchmark: ``--drivers overlay2,aufs`` or every driver that opens here.

A driver is usable when ``open_store(root, driver=NAME)`` succeeds on a scratch
directory of the work filesystem (its probe runs there); otherwise it is listed
with the DriverUnavailable reason (devicemapper on a host without kernel
device-mapper, aufs without /dev/fuse, ...) and its rows are reported as skipped.
"""

from __future__ import annotations

from pathlib import Path

from . import mounts


def known() -> list[str]:
    from layerfs.drivers import registry
    return list(registry())


def probe(name: str, scratch: Path) -> str | None:
    """None when a store with driver *name* opens under *scratch*; otherwise why not."""
    import layerfs
    root = scratch / f"probe-{name}"
    root.mkdir(parents=True, exist_ok=True)
    try:
        store = layerfs.open_store(str(root), driver=name)
        store.close()
        return None
    except layerfs.DriverUnavailable as e:
        return f"DriverUnavailable: {e}"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    finally:
        mounts.safe_rmtree(root)


def select(requested: str | None, scratch: Path) -> tuple[list[str], dict[str, str]]:
    """(usable drivers in registry order, {unusable driver: reason})."""
    try:
        names = known()
    except Exception as e:  # noqa: BLE001
        return [], {"*": f"layerfs cannot be imported: {type(e).__name__}: {e}"}
    if requested and requested != "auto":
        wanted = [n.strip() for n in requested.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ValueError(f"unknown driver(s) {', '.join(unknown)}; layerfs has {', '.join(names)}")
    else:
        wanted = names
    usable, skipped = [], {}
    for n in wanted:
        why = probe(n, scratch)
        if why is None:
            usable.append(n)
        else:
            skipped[n] = why
    return usable, skipped
