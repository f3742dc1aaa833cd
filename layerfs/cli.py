"""The ``layerfs`` command line: a thin user of the public API.

Data goes to stdout (``--json`` for machines); hints and errors go to
stderr.  A user error is one line and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import InvalidOption, LayerfsError

DEFAULT_ROOT = "/var/lib/layerfs"


def _default_root() -> str:
    env = os.environ.get("LAYERFS_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return DEFAULT_ROOT
    return str(Path.home() / ".local/share/layerfs")


def _storage_opts(pairs: list[str]) -> dict[str, str]:
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidOption(f"--storage-opt {pair!r} is not KEY=VALUE (e.g. overlay2.size=10G)")
        opts[key.strip()] = value.strip()
    return opts


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1000
    return str(n)


def _short(digest: str | None) -> str:
    return "-" if digest is None else digest.split(":", 1)[-1][:12]


class _Output:
    def __init__(self, as_json: bool):
        self.as_json = as_json

    def data(self, obj) -> None:
        print(json.dumps(obj, indent=2, sort_keys=True))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        if sys.stdout.isatty():
            from rich.console import Console
            from rich.table import Table

            table = Table(box=None, header_style="bold", pad_edge=False)
            for h in headers:
                table.add_column(h)
            for r in rows:
                table.add_row(*r)
            Console().print(table)
            return
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())

    def hint(self, text: str) -> None:
        if sys.stderr.isatty():
            print(text, file=sys.stderr)


def _layer_dict(layer) -> dict:
    return {
        "chain_id": layer.chain_id,
        "diff_id": layer.diff_id,
        "parent": layer.parent,
        "size": layer.size,
        "refs": layer.refs,
        "depth": layer.depth,
    }


def _container_dict(ctr) -> dict:
    return {"name": ctr.name, "parent": ctr.parent, "size": ctr.size, "mounts": ctr.mounts}


# -- commands ------------------------------------------------------------------


def cmd_info(store, args, out: _Output) -> None:
    status = store.status()
    if out.as_json:
        out.data(status)
        return
    for key in ("driver", "root", "layers", "containers", "mounted"):
        print(f"{key}: {status[key]}")
    print("probes:")
    for key, value in status["probes"].items():
        print(f"  {key}: {value}")


def cmd_layer_add(store, args, out: _Output) -> None:
    if args.file == "-":
        layer = store.register(sys.stdin.buffer, parent=args.parent, expected_diff_id=args.diff_id)
    else:
        layer = store.register(args.file, parent=args.parent, expected_diff_id=args.diff_id)
    if out.as_json:
        out.data(_layer_dict(layer))
    else:
        print(layer.chain_id)


def cmd_layer_ls(store, args, out: _Output) -> None:
    layers = store.layers()
    if out.as_json:
        out.data([_layer_dict(l) for l in layers])
        return
    out.table(
        ["CHAIN ID", "PARENT", "DIFF ID", "SIZE", "REFS"],
        [[_short(l.chain_id), _short(l.parent), _short(l.diff_id), _human(l.size), str(l.refs)] for l in layers],
    )


def cmd_layer_rm(store, args, out: _Output) -> None:
    for ref in args.layers:
        store.release(ref)
        print(ref)


def cmd_create(store, args, out: _Output) -> None:
    parent = None if args.parent == "scratch" else args.parent
    ctr = store.create_container(args.name, parent, size=args.size)
    if out.as_json:
        out.data(_container_dict(ctr))
    else:
        print(ctr.name)


def cmd_mount(store, args, out: _Output) -> None:
    if args.target is None:
        mounted = [c for c in store.containers() if c.mounts]
        if out.as_json:
            out.data([_container_dict(c) for c in mounted])
        else:
            for c in mounted:
                print(f"{c.name}\t{store.mount_path(c.name)}")
        return
    path = store.mount(args.target)
    if out.as_json:
        out.data({"target": args.target, "path": str(path)})
        return
    print(path)
    out.hint(f"mounted {args.target} ({store.driver.name}) — unmount with: layerfs umount {args.target}")


def cmd_umount(store, args, out: _Output) -> None:
    store.unmount(args.target)


def cmd_ps(store, args, out: _Output) -> None:
    ctrs = store.containers()
    if out.as_json:
        out.data([_container_dict(c) for c in ctrs])
        return
    out.table(
        ["NAME", "PARENT", "SIZE LIMIT", "MOUNTED"],
        [[c.name, _short(c.parent), _human(c.size), "yes" if c.mounts else "no"] for c in ctrs],
    )


def cmd_diff(store, args, out: _Output) -> None:
    changes = store.changes(args.name)
    if out.as_json:
        out.data([{"path": c.path, "kind": c.kind} for c in changes])
        return
    for c in changes:
        print(f"{c.kind} {c.path}")


def cmd_export_diff(store, args, out: _Output) -> None:
    if args.output == "-":
        diff_id = store.export_diff(args.name, sys.stdout.buffer)
        out.hint(diff_id)
        return
    target = Path(args.output)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            diff_id = store.export_diff(args.name, f)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if out.as_json:
        out.data({"name": args.name, "diff_id": diff_id, "file": str(target)})
    else:
        print(diff_id)


def cmd_commit(store, args, out: _Output) -> None:
    if args.image:
        from .engine.images import ImageStore
        from .engine.push import commit_image

        image = commit_image(ImageStore(store), args.name, args.image, message=args.message)
        if out.as_json:
            out.data({"image": image.name, "id": image.id, "top_chain": image.top_chain})
        else:
            print(image.name)
        return
    layer = store.commit(args.name)
    if out.as_json:
        out.data(_layer_dict(layer))
    else:
        print(layer.chain_id)


def cmd_rm(store, args, out: _Output) -> None:
    for name in args.names:
        store.remove_container(name, force=args.force)
        print(name)


def cmd_gc(store, args, out: _Output) -> None:
    from .engine.images import ImageStore

    result = ImageStore(store).gc()  # unreferenced blobs, then the graph
    if out.as_json:
        out.data(result)
        return
    for line in result["repaired"]:
        print(f"fixed: {line}")
    if result.get("blobs_removed"):
        print(f"removed {result['blobs_removed']} unreferenced blob(s)")
    if not result["repaired"] and not result.get("blobs_removed"):
        print("nothing to collect")


def cmd_check(store, args, out: _Output) -> int:
    problems = store.check(repair=args.repair)
    if out.as_json:
        out.data({"problems": problems, "repaired": bool(args.repair)})
    else:
        for p in problems:
            print(("fixed: " if args.repair else "") + p)
        if not problems:
            print("store is consistent")
    return 1 if problems and not args.repair else 0


def _global_flags(parser: argparse.ArgumentParser, after_command: bool) -> None:
    # The same flags are accepted after the command too (`layerfs info --json`);
    # there they default to SUPPRESS so they only override when given.
    def default(value):
        return argparse.SUPPRESS if after_command else value

    parser.add_argument("--root", default=default(None), help=f"store directory (default: $LAYERFS_ROOT or {DEFAULT_ROOT})")
    parser.add_argument("--driver", default=default("auto"), help="storage driver: auto (default), overlay2, aufs or devicemapper")
    parser.add_argument(
        "--storage-opt", action="append", default=default([]), metavar="KEY=VALUE", help="driver option (repeatable)"
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="machine-readable output")


class _SubParsers(argparse._SubParsersAction):
    def add_parser(self, name, **kwargs):
        parser = super().add_parser(name, **kwargs)
        _global_flags(parser, after_command=True)
        return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerfs", description="Container image layers and container filesystems.")
    p.register("action", "parsers", _SubParsers)
    _global_flags(p, after_command=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("info", help="driver, probes and counts").set_defaults(func=cmd_info)

    layer_parser = sub.add_parser("layer", help="image layers")
    layer_parser.register("action", "parsers", _SubParsers)
    layer = layer_parser.add_subparsers(dest="layer_command", required=True, metavar="ACTION")
    add = layer.add_parser("add", help="register a layer tar (plain, gzip or zstd; - for stdin)")
    add.add_argument("file")
    add.add_argument("--parent", default=None, help="chain id of the parent layer")
    add.add_argument("--diff-id", default=None, help="expected diff id; a mismatch stores nothing")
    add.set_defaults(func=cmd_layer_add)
    layer.add_parser("ls", help="list layers").set_defaults(func=cmd_layer_ls)
    rm = layer.add_parser("rm", help="release layers (deleted with their last reference)")
    rm.add_argument("layers", nargs="+", metavar="CHAIN_ID")
    rm.set_defaults(func=cmd_layer_rm)

    create = sub.add_parser("create", help="create a container (a writable layer)")
    create.add_argument("--size", default=None, help="size limit, e.g. 10G (needs xfs with pquota)")
    create.add_argument("parent", metavar="PARENT", help="chain id of the image layer, or 'scratch'")
    create.add_argument("name", metavar="NAME")
    create.set_defaults(func=cmd_create)

    mount = sub.add_parser("mount", help="mount a container (rw) or layer (ro) and print the path; no argument lists mounts")
    mount.add_argument("target", nargs="?", metavar="NAME|CHAIN_ID")
    mount.set_defaults(func=cmd_mount)
    umount = sub.add_parser("umount", aliases=["unmount"], help="unmount (counted: one per mount)")
    umount.add_argument("target", metavar="NAME|CHAIN_ID")
    umount.set_defaults(func=cmd_umount)

    sub.add_parser("ps", help="list containers").set_defaults(func=cmd_ps)
    diff = sub.add_parser("diff", help="changes of a container, like docker diff")
    diff.add_argument("name")
    diff.set_defaults(func=cmd_diff)
    export = sub.add_parser("export-diff", help="write a container's changes as an OCI layer tar")
    export.add_argument("name")
    export.add_argument("-o", "--output", required=True, help="file to write (- for stdout)")
    export.set_defaults(func=cmd_export_diff)
    commit = sub.add_parser("commit", help="turn a container's changes into a new layer (prints its chain id) or, with IMAGE, a new image")
    commit.add_argument("name")
    commit.add_argument("image", nargs="?", default=None, help="record an image of this name on the new layer")
    commit.add_argument("-m", "--message", default="", help="history comment for the image")
    commit.set_defaults(func=cmd_commit)
    rmc = sub.add_parser("rm", help="remove containers")
    rmc.add_argument("-f", "--force", action="store_true", help="unmount first if mounted")
    rmc.add_argument("names", nargs="+", metavar="NAME")
    rmc.set_defaults(func=cmd_rm)
    sub.add_parser("gc", help="free unreferenced state and crash leftovers").set_defaults(func=cmd_gc)
    check = sub.add_parser("check", help="verify the store; --repair fixes what it reports")
    check.add_argument("--repair", action="store_true")
    check.set_defaults(func=cmd_check)

    from .engine.cli import add_commands
    from .engine.cli_run import add_run_command

    add_commands(sub)
    add_run_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = _Output(args.json)
    try:
        from .graph import open_store

        with open_store(args.root or _default_root(), driver=args.driver, options=_storage_opts(args.storage_opt)) as store:
            return args.func(store, args, out) or 0
    except LayerfsError as exc:
        print(f"layerfs: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"layerfs: {exc.strerror}: {exc.filename or ''} (layerfs needs root for mounts)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
