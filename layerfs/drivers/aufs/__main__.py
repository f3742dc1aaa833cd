"""The per-mount daemon: ``python -m layerfs.drivers.aufs --branches TOP ... BOTTOM --mountpoint DIR``.

Mounts the union of the branch directories (top first; with ``--readonly``
every branch is read-only, otherwise the first one takes the writes) and
serves it until the mount goes away (umount, fusermount3 -u) or SIGTERM/SIGINT
(which unmount).  The driver starts it detached and waits until the mount
answers; errors go to stderr, which the driver points at a log file.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m layerfs.drivers.aufs", description=__doc__.split("\n")[0])
    p.add_argument("--branches", nargs="+", required=True, help="branch directories, top first")
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--readonly", action="store_true", help="a read-only view: writes fail with EROFS")
    p.add_argument("--fsname", default="layerfs-aufs")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--no-lowlevel", action="store_true",
                   help="leave pyfuse3 as it is: its operations table (see _lowlevel) and its trio main loop "
                        "(see _loop); slower")
    p.add_argument("--detach", metavar="PIDFILE", help="fork, write the daemon's pid to PIDFILE and return at once")
    args = p.parse_args(argv)

    if args.detach:
        pid = os.fork()
        if pid:
            tmp = f"{args.detach}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(f"{pid}\n")
            os.replace(tmp, args.detach)
            os._exit(0)

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s aufs[%(process)d] %(levelname)s %(message)s",
    )
    log = logging.getLogger("layerfs.aufs")
    os.umask(0)  # the kernel already applied the caller's umask to every mode we get
    for b in args.branches:
        if not os.path.isdir(b):
            log.error("branch %s is not a directory", b)
            return 2

    import pyfuse3

    from .fs import UnionOps

    ops = UnionOps(args.branches, writable=not args.readonly)
    from . import _loop, _lowlevel

    hook = _lowlevel.Hook() if args.no_lowlevel else _lowlevel.install(ops.write_direct)
    if not args.no_lowlevel:
        _lowlevel.lighten_trio()
    options = {
        f"fsname={args.fsname}",
        "subtype=layerfs-aufs",
        "default_permissions",  # the kernel checks modes and owners
        "allow_other",  # containers run as any user
        "dev",
        "suid",
    }
    if args.readonly:
        options.add("ro")
    if args.debug:
        options.add("debug")
    pyfuse3.init(ops, args.mountpoint, options)
    ops.decline_opendir = hook.active
    if not hook.active:
        log.info("pyfuse3's operations are not wrapped: the daemon serves opendir and copies writes")
    log.info("mounted %s (%d branches%s)", args.mountpoint, len(args.branches), ", read-only" if args.readonly else "")

    loop = None if args.no_lowlevel else _loop.prepare()
    if loop is not None:
        log.info("serving requests in a blocking loop (no trio)")
    try:
        stopped = loop.run() if loop is not None else _serve_under_trio()
    except BaseException:
        log.exception("serving %s failed", args.mountpoint)
        pyfuse3.close(unmount=True)
        raise
    # After an external umount the session is gone; after a signal we unmount.
    pyfuse3.close(unmount=stopped)
    log.info("unmounted %s", args.mountpoint)
    return 0


def _serve_under_trio() -> bool:
    """pyfuse3's own main loop; True when stopped by SIGTERM/SIGINT."""
    import pyfuse3
    import trio

    stopped = []

    async def serve() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        stopped.append(True)
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            # One worker: every handler runs to completion without awaiting
            # (fs.py), so more workers would only hand pyfuse3's read lock
            # back and forth between tasks on every request.
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            nursery.cancel_scope.cancel()

    trio.run(serve)
    return bool(stopped)


if __name__ == "__main__":
    sys.exit(main())
