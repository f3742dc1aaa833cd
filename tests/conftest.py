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

from dmstore import dm_template  # noqa: E402,F401  (a session fixture, used by store_root)

#: Drivers the conformance suite runs against; later drivers add themselves.
#: devicemapper needs a kernel with device-mapper: on a host without it its
#: tests skip; they run inside the VM (see DM_VM_STEP).
DRIVERS = ("overlay2", "aufs", pytest.param("devicemapper", marks=pytest.mark.dm_conformance))

#: The devicemapper conformance tests the default VM step (``-m vm``, run by
#: ``make test``) includes: test function names (every parameter) or item
#: names (one parameter).  Under TCG a devicemapper conformance test costs
#: 2-8 s (every layer is a thin snapshot that is activated, mounted,
#: unmounted and deactivated), so the whole suite (~15 min) does not fit the
#: step's 10 minutes next to the other VM tests.  Every test of the suite runs
#: with ``tests/vm/run.py --marker dm_conformance`` (docs/devicemapper.md).
DM_VM_STEP = frozenset({
    # test_containers.py: all of it
    "test_create_container_on_layer", "test_create_container_from_scratch", "test_create_container_unknown_parent",
    "test_container_names_are_unique", "test_unknown_container_is_not_found", "test_writes_persist_across_mounts",
    "test_containers_are_isolated", "test_mount_is_reference_counted", "test_view_mount_is_reference_counted",
    "test_mount_returns_a_path", "test_view_is_read_only", "test_root_permission_0755",
    "test_remove_mounted_container_is_in_use", "test_remove_twice_mounted_container_is_in_use_until_last_unmount",
    "test_force_remove_mounted_container", "test_remove_then_reuse_name", "test_removed_container_files_are_reclaimed",
    "test_commit_keeps_container", "test_status_names_driver", "test_check_healthy_store", "test_close_twice",
    "test_context_manager", "test_containers_survive_reopen", "test_auto_driver_keeps_existing_driver",
    "test_unknown_option_is_invalid_option",
    # test_layers.py: what touches the driver (not the tar/compression parsing variants)
    "test_diff_id_is_sha256_of_uncompressed_tar", "test_chain_ids_follow_oci_image_spec", "test_layer_lookup_and_listing",
    "test_size_counts_regular_file_content", "test_empty_layer", "test_expected_diff_id_mismatch_stores_nothing",
    "test_same_content_same_parent_is_one_layer", "test_released_layer_files_are_reclaimed",
    "test_release_layer_with_child_layer_is_in_use", "test_release_mounted_layer_is_in_use",
    "test_layers_survive_reopen", "test_gc_keeps_referenced_layers",
    # test_changes.py
    "test_changes_kinds", "test_changes_opaque_directory", "test_changes_move_file_from_lower_layer",
    "test_changes_chown_directory", "test_changes_replace_deleted_file_with_new_file", "test_commit_round_trip",
    "test_export_diff_entries", "test_exported_diff_applies_deletions_on_another_container",
    "test_unusual_names_in_changes_and_round_trip", "test_commit_of_container_without_parent",
    # test_tar_content.py
    "test_whiteouts_hide_lower_entries", "test_opaque_directory_hides_only_lower_content",
    "test_modes_owners_and_special_bits", "test_device_nodes_and_fifos", "test_hardlinks_share_an_inode",
    "test_xattrs_survive_register_and_mount[devicemapper-capability-setuid]", "test_symlinks",
    "test_type_changes_across_layers", "test_read_only_view_and_container_agree", "test_view_of_layer_is_read_only",
    "test_root_of_layer_is_0755_when_tar_has_no_root_entry", "test_long_paths",
    # test_snapshot_suite.py (containerd's)
    "test_basic", "test_transitivity", "test_remove_intermediate_layer_is_in_use", "test_view_readonly",
    "test_root_permission", "test_rename", "test_deleted_files_in_child_snapshot",
    # test_hostile.py: one of each kind, the rest share the code path
    "test_hostile_tar_is_refused[devicemapper-base-dotdot-file]",
    "test_hostile_tar_is_refused[devicemapper-child-symlink-abs-then-file]",
    "test_hostile_tar_is_refused[devicemapper-child-hardlink-absolute-outside]",
    "test_malformed_tar_is_refused[devicemapper-truncated-in-content]", "test_invalid_layer_error_names_the_entry",
    # test_graphtest.py (moby's)
    "test_create_base", "test_create_snap", "test_changes[devicemapper-20]",
    "test_diff_apply_with_deletions[devicemapper-10]", "test_set_quota_or_refuse",
    # test_processes.py
    "test_mount_refcount_survives_process_exit", "test_other_process_sees_container_and_name_conflict",
    "test_kill_during_commit",
})


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "dm_conformance: the conformance suite on devicemapper (in the VM: "
        "tests/vm/run.py --marker dm_conformance); the DM_VM_STEP subset is also marked vm")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the DM_VM_STEP subset of the devicemapper conformance tests ``vm`` (before -m selects)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("driver_name") == "devicemapper" \
                and (item.originalname in DM_VM_STEP or item.name in DM_VM_STEP):
            item.add_marker(pytest.mark.vm)

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
def store_root(tmp_path, request) -> Path:
    """The (fresh, empty) root directory the `store` fixture opens.

    For devicemapper the root is on the VM's disk-backed scratch and comes
    seeded with a fresh copy of the session's template pool (see
    tests/dmstore.py): a store of its own, without running mkfs per test.
    """
    driver = request.getfixturevalue("driver_name") if "driver_name" in request.fixturenames else None
    if driver == "devicemapper":
        import dmstore

        template = request.getfixturevalue("dm_template")
        where = dmstore.scratch(tmp_path)
        root = where / "root"
        dmstore.seed(template, root / "devicemapper")
        yield root
        dmstore.teardown_home(root / "devicemapper")
        detach_mounts_under(tmp_path)
        if where != tmp_path:
            shutil.rmtree(where, ignore_errors=True)
        return
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
