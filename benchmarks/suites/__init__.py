"""The workloads. Each suite is a generator ``suite(ctx)`` yielding Benchmarks.

To add one: write a module with ``suite(ctx)`` (build fixtures, ``yield`` one
:class:`benchmarks.runner.Benchmark` per measurement, clean up in ``finally``)
and list it here. Suites run in this order unless ``--suite`` picks some.
"""

from . import changes, dm, export, fs, mount, open_store, pull, register, scaling, snapshot

SUITES = {
    "register": register.suite,
    "mount": mount.suite,
    "changes": changes.suite,
    "open_store": open_store.suite,
    "fs": fs.suite,
    "pull": pull.suite,
    "snapshot": snapshot.suite,
    "export": export.export_suite,
    "gc": export.gc_suite,
    "scaling": scaling.suite,
    "dm": dm.suite,  # devicemapper only; runs in the VM: tests/vm/bench_dm.py
}
# Left out of a --quick run unless named with --suite: their private daemons' starts and a load of
# the image per round add ~100 s, which would take the quick run of every suite past 3 minutes.
NOT_QUICK = {"export": "private dockerd/containerd starts and a load of the image per gc round (~100 s)",
             "gc": "private dockerd/containerd starts and a load of the image per gc round (~100 s)"}
# Run once per layerfs driver (rows NAME[driver]); the others compare drivers inside one benchmark.
PER_DRIVER = {"register", "mount", "changes", "open_store"}
