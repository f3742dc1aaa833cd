"""``layerfs run``: run a command in a new container of an image (see :mod:`layerfs.engine.runtime`).

Wired into the main parser with ``add_run_command(sub)``; its handler
returns the container's exit status, which becomes layerfs's own.
"""

from __future__ import annotations

import argparse
import os

from .runtime import NETWORKS, RUNTIMES, run


def _env_item(item: str) -> str:
    # docker's `--env KEY` (no value) takes KEY from our own environment.
    if "=" not in item and item in os.environ:
        return f"{item}={os.environ[item]}"
    return item


def cmd_run(store, args, out) -> int:
    from .images import ImageStore

    return run(
        store,
        ImageStore(store),
        args.image,
        list(args.cmd),
        name=args.name,
        rm=args.rm,
        env=[_env_item(e) for e in args.env],
        workdir=args.workdir,
        user=args.user,
        runtime=args.runtime,
        network=args.network,
        tty=args.tty,
    )


def add_run_command(subparsers) -> argparse.ArgumentParser:
    """Register ``layerfs run`` on the main parser's subcommands."""
    p = subparsers.add_parser(
        "run",
        help="run a command in a new container of an image (runc); exits with the command's status",
        description="Create a container of IMAGE, mount it, run CMD (default: the image's Entrypoint + Cmd) "
        "with an OCI runtime in the foreground, and exit with its status (128+N for signal N; "
        "125 when the container could not be started, 126/127 when CMD cannot be executed/found).",
    )
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("--name", default=None, help="container name (default: layerfs-<8 hex>)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set an environment variable (repeatable; KEY alone takes our value)")
    p.add_argument("-w", "--workdir", default=None, metavar="DIR", help="working directory (absolute)")
    p.add_argument("-u", "--user", default=None, metavar="UID[:GID]", help="user to run as (or NAME[:GROUP] from the image)")
    p.add_argument("--runtime", choices=RUNTIMES, default="runc", help="OCI runtime (default: runc)")
    p.add_argument("--network", choices=NETWORKS, default="none",
                   help="none: own network namespace with loopback only (default); host: the host's network")
    tty = p.add_mutually_exclusive_group()
    tty.add_argument("-t", "--tty", dest="tty", action="store_const", const=True, default=None,
                     help="allocate a terminal (default: when stdin is one)")
    tty.add_argument("--no-tty", dest="tty", action="store_const", const=False, help="never allocate a terminal")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="command and arguments (default: the image's)")
    p.set_defaults(func=cmd_run)
    return p
