"""The workloads. Each suite is a generator ``suite(ctx)`` yielding Benchmarks.

To add one: write a module with ``suite(ctx)`` (build fixtures, ``yield`` one
:class:`benchmarks.runner.Benchmark` per measurement, clean up in ``finally``)
and list it here. Suites run in this order unless ``--suite`` picks some.
"""

from . import changes, mount, open_store, pull, register

SUITES = {
    "register": register.suite,
    "mount": mount.suite,
    "changes": changes.suite,
    "open_store": open_store.suite,
    "pull": pull.suite,
}
