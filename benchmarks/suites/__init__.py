"""The workloads. Each suite is a generator ``suite(ctx)`` yielding Benchmarks.

To add one: write a module with ``suite(ctx)`` (build fixtures, ``yield`` one
:class:`benchmarks.runner.Benchmark` per measurement, clean up in ``finally``)
and list it here. Suites run in this order unless ``--suite`` picks some.
"""

from . import changes, dm, fs, mount, open_store, pull, register, scaling, snapshot

SUITES = {
    "register": register.suite,
    "mount": mount.suite,
    "changes": changes.suite,
    "open_store": open_store.suite,
    "fs": fs.suite,
    "pull": pull.suite,
    "snapshot": snapshot.suite,
    "scaling": scaling.suite,
    "dm": dm.suite,  # devicemapper only; runs in the VM: tests/vm/bench_dm.py
}
# Run once per layerfs driver (rows NAME[driver]); the others compare drivers inside one benchmark.
PER_DRIVER = {"register", "mount", "changes", "open_store"}
