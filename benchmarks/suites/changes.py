"""changes: store.changes() of a container that touched 1,000 files of a 50,000-file image.

The image is three deterministic layers (30,000 + 15,000 + 5,000 small files).
The container is mounted and, through the mount, 400 lower files are modified
(copy-up), 400 files are added (a quarter of them in new directories) and 200
lower files are deleted (whiteouts). The container stays mounted while
``store.changes(name)`` is timed, as with ``docker diff`` of a running container;
dentry and inode caches are warm (the first call is a warm-up). The result is
checked once against the known set of changes.
"""

from __future__ import annotations

import random
from pathlib import Path

from .. import synth
from ..runner import Benchmark, Contender, Target, stopwatch

FULL = {"layers": (30_000, 15_000, 5_000), "modified": 400, "added": 400, "deleted": 200}
QUICK = {"layers": (3_000, 1_500, 500), "modified": 40, "added": 40, "deleted": 20}


def image_specs(layers) -> list[synth.TreeSpec]:
    return [synth.TreeSpec(files=n, total_bytes=n * 400, seed=200 + i, tag=f"c{i}",
                           size_sigma=1.0, files_per_dir=25) for i, n in enumerate(layers)]


def mutate(merged: Path, files: list[str], plan: dict, seed: int = 7) -> dict[str, str]:
    """Apply the planned modifications through the mount; return {path: expected kind}."""
    rng = random.Random(seed)
    picked = rng.sample(files, plan["modified"] + plan["deleted"])
    modified, deleted = picked[:plan["modified"]], picked[plan["modified"]:]
    expected: dict[str, str] = {}
    for p in modified:
        with open(merged / p, "ab") as f:
            f.write(b"changed by the benchmark\n")
        expected["/" + p] = "C"
    for p in deleted:
        (merged / p).unlink()
        expected["/" + p] = "D"
    dirs = sorted({str(Path(p).parent) for p in files})
    new_dirs = [f"{rng.choice(dirs)}/bench-new-{i}" for i in range(max(1, plan["added"] // 40))]
    for d in new_dirs:
        (merged / d).mkdir()
        expected["/" + d] = "A"
    for i in range(plan["added"]):
        d = new_dirs[i % len(new_dirs)] if i < plan["added"] // 4 else rng.choice(dirs)
        p = f"{d}/bench-added-{i}.txt"
        (merged / p).write_bytes(b"added %d\n" % i)
        expected["/" + p] = "A"
    return expected


def suite(ctx):
    ctx.layerfs()
    plan = ctx.pick(FULL, QUICK)
    specs = image_specs(plan["layers"])
    root = ctx.scratch("changes-store")
    store = None
    name = "bench-changes"
    try:
        store = ctx.open_store(root)
        parent, files = None, []
        for spec in specs:
            tar, _ = synth.cached_tar(spec, ctx.cache_dir)
            parent = store.register(str(tar), parent=parent).chain_id
            files += [e.path for e in synth.plan(spec) if e.kind == "file"]
        store.create_container(name, parent)
        merged = Path(store.mount(name))
        expected = mutate(merged, files, plan)

        got = {c.path: c.kind for c in store.changes(name)}
        wrong = {p: (k, got.get(p)) for p, k in expected.items() if got.get(p) != k}
        if wrong:
            sample = list(wrong.items())[:5]
            raise AssertionError(f"changes() disagrees on {len(wrong)} of {len(expected)} known "
                                 f"changes, e.g. {sample} (path: (expected, got))")
        status = store.status()

        def once() -> float:
            with stopwatch() as t:
                store.changes(name)
            return t.elapsed

        touched = plan["modified"] + plan["added"] + plan["deleted"]
        yield Benchmark(
            name="changes",
            description=f"changes() of a container that touched {touched:,} files "
                        f"on a {sum(plan['layers']):,}-file, {len(specs)}-layer image",
            contenders=[Contender("layerfs changes()", once, role="layerfs",
                                  info={"driver": status.get("driver")})],
            subject="layerfs changes()",
            target=Target.ms(50),
            runs=21, quick_runs=3, warmup=1,
            workload={**plan, "image_files": sum(plan["layers"]), "changes_reported": len(got),
                      "store_status": status},
            notes=["container mounted while timed (like `docker diff` of a running container); "
                   "warm dentry/inode caches",
                   f"result checked once: all {len(expected):,} known changes reported with the "
                   f"right kind ({len(got):,} entries incl. parent directories)"],
        )
    finally:
        if store is not None:
            try:
                store.unmount(name)
            except Exception:  # noqa: BLE001
                pass
            try:
                store.remove_container(name, force=True)
            except Exception:  # noqa: BLE001
                pass
            store.close()
        ctx.remove(root)
