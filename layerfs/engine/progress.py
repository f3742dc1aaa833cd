"""Progress of pulls and pushes: a live per-layer display on a terminal,
one JSON event per line with --json, nothing otherwise."""

from __future__ import annotations

import json
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def reporter(as_json: bool) -> Iterator[Callable[[dict], None]]:
    if as_json:
        lock = threading.Lock()

        def emit_json(event: dict) -> None:
            with lock:
                sys.stdout.write(json.dumps(event) + "\n")
                sys.stdout.flush()

        yield emit_json
        return
    if not sys.stderr.isatty():
        yield lambda event: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[status]}"),
        console=Console(stderr=True), transient=False,
    )
    tasks: dict[str, int] = {}
    lock = threading.Lock()

    def emit(event: dict) -> None:
        if event.get("event") != "layer":
            return
        digest = event["digest"]
        with lock:
            if digest not in tasks:
                tasks[digest] = progress.add_task(digest.split(":", 1)[-1][:12], total=event.get("total") or None, status="")
            task = tasks[digest]
            status = event.get("status", "")
            done = event.get("bytes")
            if status in ("exists", "downloaded", "done"):  # "applying" may come while downloading
                done = event.get("total")
            progress.update(task, status=status, **({"completed": done} if done is not None else {}))

    with progress:
        yield emit
