"""Shared fixtures: a fresh layerfs store per test, for every driver.

The conformance suite (``tests/conformance``) runs every test once per driver
in :data:`DRIVERS`; a new driver joins the suite by adding its name there.
Each test gets a fresh store in a fresh temporary root.  Tests unmount what
they mount, but teardown also detaches anything still mounted under the root
(read from /proc/self/mountinfo), so one failing test cannot break the next.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import sys
from pathlib import Path

import pytest

# Let test modules `import tarbuild` and `from conformance import ...` however
# pytest was invoked (with or without a tests/__init__.py).
_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

#: Drivers the conformance suite runs against; later drivers add themselves.
DRIVERS = ("overlay2", "aufs")

_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path) -> list[str]:
    """Mount points at or below *path*, in mount order (oldest first)."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape_mountinfo(line.split()[4])
            if mp == base or mp.startswith(base.rstrip("/") + "/"):
                found.append(mp)
    return found


def detach_mounts_under(path) -> list[str]:
    """Lazily unmount everything mounted at or below *path*; returns what was found."""
    leaked: list[str] = []
    for _ in range(20):
        mps = mounts_under(path)
        if not mps:
            break
        leaked.extend(m for m in mps if m not in leaked)
        # newest (topmost) first
        for mp in reversed(mps):
            _libc.umount2(os.fsencode(mp), _MNT_DETACH)
    return leaked


def _require_root():
    if os.geteuid() != 0:
        pytest.skip("layerfs conformance tests need root (mounts, chown, mknod)")


def open_store_or_skip(root, driver, options=None):
    """Open a store, skipping the test when the driver cannot work here."""
    import layerfs
    from layerfs import errors

    _require_root()
    try:
        return layerfs.open_store(root, driver=driver, options=options)
    except errors.DriverUnavailable as e:
        pytest.skip(f"driver {driver} unavailable here: {e}")


@pytest.fixture(params=DRIVERS)
def driver_name(request) -> str:
    return request.param


@pytest.fixture
def store_root(tmp_path) -> Path:
    """The (fresh, empty) root directory the `store` fixture opens."""
    root = tmp_path / "root"
    root.mkdir()
    yield root
    # Whatever happened, leave nothing mounted below this test's tmp dir.
    detach_mounts_under(tmp_path)


@pytest.fixture
def work_dir(tmp_path) -> Path:
    """A scratch directory outside the store (flat reference trees etc.)."""
    d = tmp_path / "work"
    d.mkdir()
    return d


@pytest.fixture
def store(driver_name, store_root, tmp_path):
    """A fresh store for one test on one driver; closed and unmounted afterwards."""
    s = open_store_or_skip(store_root, driver_name)
    try:
        yield s
    finally:
        try:
            s.close()
        finally:
            leaked = detach_mounts_under(tmp_path)
            if not mounts_under(tmp_path):
                shutil.rmtree(tmp_path, ignore_errors=True)
            if leaked:
                # Not a failure of the test itself (it may have failed before
                # unmounting); reported so that leaks stay visible.
                sys.stderr.write(f"\nconftest: detached leftover mounts: {leaked}\n")
