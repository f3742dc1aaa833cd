"""open_store: open and close a store holding 1,000 layers and 1,000 containers.

The graph is built once per run: 100 chains of depth 10 of tiny distinct layers
(one small file each, built in memory), and one container on every layer, none
mounted. Each iteration times ``layerfs.open_store(root)`` + ``close()`` in this
process (caches warm after the warm-up).
"""

from __future__ import annotations

import io
import tarfile
import time

from ..runner import Benchmark, Contender, Target, stopwatch

FULL = {"chains": 100, "depth": 10, "containers": 1_000}
QUICK = {"chains": 10, "depth": 10, "containers": 100}


def tiny_layer(i: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo(f"layer{i // 100}")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tf.addfile(d)
        data = f"layer {i}\n".encode()
        ti = tarfile.TarInfo(f"layer{i // 100}/file{i}")
        ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
        tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def suite(ctx):
    ctx.layerfs()
    g = ctx.pick(FULL, QUICK)
    root = ctx.scratch("open-store")
    store = None
    try:
        t0 = time.monotonic()
        store = ctx.open_store(root)
        layers = []
        for c in range(g["chains"]):
            parent = None
            for d in range(g["depth"]):
                parent = store.register(io.BytesIO(tiny_layer(c * g["depth"] + d)), parent=parent).chain_id
                layers.append(parent)
        for i in range(g["containers"]):
            store.create_container(f"bench-ctr-{i}", layers[i % len(layers)])
        nl, nc = len(store.layers()), len(store.containers())
        status = store.status()
        store.close()
        store = None
        build_s = time.monotonic() - t0
        if nl != len(layers) or nc != g["containers"]:
            raise AssertionError(f"built {nl} layers / {nc} containers, "
                                 f"expected {len(layers)} / {g['containers']}")

        def once() -> float:
            with stopwatch() as t:
                s = ctx.open_store(root)
                s.close()
            return t.elapsed

        yield Benchmark(
            name="open_store",
            description=f"open_store + close on a graph of {nl:,} layers and {nc:,} containers",
            contenders=[Contender("layerfs open_store+close", once, role="layerfs",
                                  info={"driver": status.get("driver")})],
            subject="layerfs open_store+close",
            target=Target.ms(150),
            runs=21, quick_runs=3, warmup=1,
            workload={**g, "layers": nl, "containers": nc, "build_s": round(build_s, 2),
                      "store_status": status},
            notes=[f"graph of {g['chains']} chains x depth {g['depth']}, one container per layer, "
                   "none mounted; built once per run (untimed, "
                   f"{build_s:.1f} s); in-process open, warm caches"],
        )
    finally:
        if store is not None:
            store.close()
        ctx.remove(root)
