"""layerfs benchmark harness: ``python -m benchmarks run [--suite NAME ...] [--quick] [--out DIR]``.

Layout
------
``runner``      generic: Contender / Benchmark / Target, A/B alternation, statistics
``context``     RunContext handed to suites: out/cache/work dirs, store factory, CLI prefix
``suites/``     one module per workload (register, mount, changes, open_store); each a
                generator that builds fixtures, yields Benchmarks and cleans up
``synth``       deterministic synthetic layer tars, cached under ``OUT/cache``
``mounts``      mount table sweep, mount(2)/umount2(2), rm that never crosses a mount
``machine``     what the figures were measured on
``report``      results.json and results.md

Rules the runner enforces: every contender of a benchmark is measured in the same
run, round-robin (A, B, A, B, ...), after untimed warm-up rounds; medians of at
least 5 rounds (fewer only with ``--quick``, a smoke run that never judges
timings); max/min > 1.5 is flagged as a wide spread. Peers (Docker, containerd,
podman, fuse-overlayfs) and other layerfs drivers join later as more Contenders
of the same Benchmarks.
"""
