"""python -m benchmarks.peers install [docker|containerd|podman|fuse-overlayfs|all] ... | status"""

from __future__ import annotations

import argparse
import json
import sys

from . import PEERS, install, versions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install", help="apt-get install peers (idempotent)")
    i.add_argument("peers", nargs="*", default=["all"], choices=[*PEERS, "all"], metavar="PEER",
                   help=f"one or more of {', '.join(PEERS)}, all (default all)")
    sub.add_parser("status", help="which peers are installed, with versions (JSON)")
    args = p.parse_args(argv)
    if args.cmd == "install":
        names = list(PEERS) if "all" in args.peers else list(dict.fromkeys(args.peers))
        return install(names, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(versions(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
