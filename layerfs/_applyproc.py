"""Apply a layer tar in a worker process while this process feeds it.

Why: unpacking a layer is Python work per tar entry plus a handful of
syscalls per file, all under one interpreter lock, so layers applied side by
side on threads (``register_chain``) share one core.  With a worker process
per layer each gets its own interpreter: this process reads, decompresses
and hashes the stream (C code that releases the lock) and pipes the plain
tar to the worker, which parses it and writes the entries with
:func:`layerfs.archive.apply_entries`, then reports ``{"size", "whiteouts"}``
or the error as one JSON line.

Why a fresh interpreter (``python -m layerfs._applyproc``) and not fork: a
fork of a threaded process inherits locks and objects of the other threads,
whose finalizers may later close file descriptors the child has reused.  The
start-up (~0.1 s) is paid only for big layers (the caller decides).  The
worker dies with the thread that started it (``PR_SET_PDEATHSIG``), so it
never outlives an interrupted apply, and the caller reaps it before the
directory is its own again (to keep, or to remove after a failure).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys

from . import archive
from .errors import InvalidLayer, LayerfsError

_PR_SET_PDEATHSIG = 1
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_BYTES = 1 << 20  # the default maximum for an unprivileged pipe, and our chunk size


def spawn(dest: str, fmt: archive.WhiteoutFormat) -> subprocess.Popen | None:
    """Start a worker for *dest*; None when no worker can be started here (apply in process)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(archive.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "layerfs._applyproc", dest, fmt.name, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
    except OSError:
        return None


def apply_in_worker(worker: subprocess.Popen, stream, dest: str, compression: str) -> archive.ApplyResult:
    """Feed *stream* (an uncompressed tar) to *worker*; like ``apply_entries`` plus the diff id."""
    sha = hashlib.sha256()
    try:
        fcntl.fcntl(worker.stdin.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
    except OSError:
        pass  # a 64 KiB pipe only means more wake-ups
    try:
        try:
            while chunk := stream.read(archive.CHUNK):
                sha.update(chunk)
                worker.stdin.write(chunk)
        except BrokenPipeError:
            pass  # the worker stopped reading: its report says why
        except archive.STREAM_ERRORS as exc:
            raise InvalidLayer(f"layer tar is truncated or malformed ({type(exc).__name__}: {exc})") from None
        finally:
            try:
                worker.stdin.close()
            except BrokenPipeError:
                pass
        report = _parse(worker.stdout.read())
        status = worker.wait()
    except BaseException:
        worker.kill()
        worker.wait()
        raise
    finally:
        worker.stdout.close()
    if report is None:
        how = f"killed by {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
        raise LayerfsError(f"the process applying the layer into {dest} died ({how}); nothing was stored")
    if "error" in report:
        _raise(report)
    return archive.ApplyResult("sha256:" + sha.hexdigest(), report["size"], compression, tuple(report["whiteouts"]))


def _parse(data: bytes) -> dict | None:
    try:
        report = json.loads(data)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _raise(report: dict) -> None:
    message = str(report.get("message", ""))
    if report["error"] == "InvalidLayer":
        raise InvalidLayer(message)
    if report["error"] == "OSError":
        number = report.get("errno") or errno.EIO
        raise OSError(number, os.strerror(number), report.get("filename"))
    raise LayerfsError(f"applying the layer failed in its worker process: {report['error']}: {message}")


def _main(argv: list[str]) -> int:
    dest, fmt_name, parent = argv[0], argv[1], int(argv[2])
    # Why: this process lives for one layer and makes no reference cycles;
    # the collector's passes over every parsed member are pure overhead.
    gc.disable()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 1  # the caller died before the line above took effect
    out = os.fdopen(os.dup(1), "w")
    try:
        with open(0, "rb", buffering=0, closefd=False) as reader:
            result = archive.apply_entries(reader, dest, archive.WhiteoutFormat[fmt_name])
        report: dict = {"size": result.size, "whiteouts": list(result.whiteouts)}
    except InvalidLayer as exc:
        report = {"error": "InvalidLayer", "message": str(exc)}
    except OSError as exc:
        report = {"error": "OSError", "errno": exc.errno, "message": str(exc), "filename": exc.filename}
    except Exception as exc:
        report = {"error": type(exc).__name__, "message": str(exc)}
    out.write(json.dumps(report, default=str))
    out.close()
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
