"""layerfs benchmark harness: ``python -m benchmarks run [--suite NAME ...] [--drivers D1,D2] [--peers P1,P2] [--quick] [--out DIR]``.

Layout
------
``runner``      generic: Contender / Benchmark / Target, rounds in a balanced order, statistics
``context``     RunContext handed to suites: out/cache/work dirs, store factory, CLI prefix
``suites/``     one module per workload (register, mount, changes, open_store -- run once
                per layerfs driver; fs, pull, snapshot -- drivers and peers side by side);
                each a generator that builds fixtures, yields Benchmarks and cleans up
``drivers``     which layerfs drivers open here (``--drivers``; the others skipped with the
                DriverUnavailable reason)
``peers/``      ``python -m benchmarks.peers install ...`` (apt) and private dockerd /
                containerd daemons (own socket and data dir, stopped by PID)
``plots``       PNG grouped bars per operation next to results.md (matplotlib, Agg)
``synth``       deterministic synthetic layer tars, cached under ``OUT/cache``
``mounts``      mount table sweep, mount(2)/umount2(2), rm that never crosses a mount
``machine``     what the figures were measured on
``report``      results.json and results.md

Rules the runner enforces: every contender of a benchmark is measured in the same
run, round-robin (A, B, A, B, ...), after untimed warm-up rounds; medians of at
least 5 rounds (fewer only with ``--quick``, a smoke run that never judges
timings); max/min > 1.5 is flagged as a wide spread. Peers (Docker, containerd,
fuse-overlayfs, a plain kernel overlay mount) and the layerfs drivers are more
Contenders of the same Benchmarks; a peer that is not installed or fails here is
left out with the reason.
"""
