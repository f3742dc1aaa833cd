#!/usr/bin/env python3
"""Build a small, deterministic three-layer sample image from busybox-static.

    python3 scripts/build_sample_image.py OUTDIR [--busybox /bin/busybox]
                                                 [--compression mixed|none|gzip]

Layers (OCI layer tars, in order):
  layer1  a minimal rootfs: /bin/busybox plus applet symlinks (sh, ls, cat, ...),
          /etc/passwd, /etc/group, /etc/hostname, /tmp (1777), /root (0700),
          /dev, /proc, /sys, /home, /usr/bin, /var/log
  layer2  adds /etc/motd, /etc/obsolete.conf (deleted again in layer 3) and a
          directory /opt/app with /opt/app/config.txt
  layer3  deletes /etc/obsolete.conf (OCI whiteout /etc/.wh.obsolete.conf) and
          adds /opt/app/VERSION

Every entry has a fixed mtime and root ownership and the entries are written in
a fixed order, so the diff ids (sha256 of the uncompressed tar) and chain ids
are the same on every run with the same busybox binary. gzip output uses a
fixed header (mtime 0, no file name), so the .tar.gz files are reproducible too.

Writes OUTDIR/layer{1,2,3}.tar[.gz] and OUTDIR/manifest.json:
  {"layers": [{"file", "compression", "diff_id", "chain_id", "parent"}, ...]}
and prints one line per layer: FILE DIFF_ID CHAIN_ID.
Uses only the standard library (runs with the system python3).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z, fixed for reproducible digests

APPLETS = [
    "sh", "ash", "ls", "cat", "echo", "grep", "mkdir", "rm", "rmdir", "touch",
    "cp", "mv", "ln", "find", "head", "tail", "wc", "id", "pwd", "env", "sed",
    "uname", "stat", "du", "df", "sleep", "true", "false", "printf", "test",
    "chmod", "chown", "date", "hostname", "whoami", "vi", "less", "ps",
]

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""

GROUP = """\
root:x:0:
daemon:x:1:
tty:x:5:
nogroup:x:65534:
"""

MOTD = """\
Welcome to the layerfs sample image.
This rootfs is three OCI layers (busybox, config, update) on a layerfs store.
"""


class LayerWriter:
    """Collects tar entries in order and produces the uncompressed tar bytes."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, type_: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = type_
        ti.mode = mode
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = MTIME
        return ti

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes | str, mode: int = 0o644) -> None:
        if isinstance(data, str):
            data = data.encode()
        ti = self._info(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self._tar.addfile(ti, io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self._tar.addfile(ti)

    def whiteout(self, dirname: str, name: str) -> None:
        """OCI whiteout: an empty file `.wh.<name>` deletes <name> from lower layers."""
        prefix = f"{dirname}/" if dirname else ""
        self.file(f"{prefix}.wh.{name}", b"", 0o644)

    def finish(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def layer1(busybox: bytes) -> bytes:
    w = LayerWriter()
    w.dir("bin")
    w.file("bin/busybox", busybox, 0o755)
    for applet in APPLETS:
        w.symlink(f"bin/{applet}", "busybox")
    w.dir("dev")
    w.dir("etc")
    w.file("etc/group", GROUP)
    w.file("etc/hostname", "layerfs-sample\n")
    w.file("etc/passwd", PASSWD)
    w.dir("home")
    w.dir("proc", 0o555)
    w.dir("root", 0o700)
    w.dir("sys", 0o555)
    w.dir("tmp", 0o1777)
    w.dir("usr")
    w.dir("usr/bin")
    w.dir("var")
    w.dir("var/log")
    return w.finish()


def layer2() -> bytes:
    w = LayerWriter()
    w.dir("etc")
    w.file("etc/motd", MOTD)
    w.file("etc/obsolete.conf", "# this file is deleted by layer 3\nobsolete=yes\n")
    w.dir("opt")
    w.dir("opt/app")
    w.file("opt/app/config.txt", "greeting=hello\nlayers=3\n")
    return w.finish()


def layer3() -> bytes:
    w = LayerWriter()
    w.dir("etc")
    w.whiteout("etc", "obsolete.conf")
    w.dir("opt")
    w.dir("opt/app")
    w.file("opt/app/VERSION", "1.0.0\n")
    return w.finish()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(parent: str | None, diff_id: str) -> str:
    """OCI image spec: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    if parent is None:
        return diff_id
    return sha256(f"{parent} {diff_id}".encode())


def gzip_bytes(data: bytes) -> bytes:
    out = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything that varies.
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return out.getvalue()


def find_busybox(explicit: str | None) -> Path:
    candidates = [explicit] if explicit else ["/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")]
    for c in candidates:
        if c and os.path.isfile(c):
            return Path(c)
    sys.exit("build_sample_image: busybox not found; install busybox-static (make setup)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--busybox", help="busybox binary to use (default: /bin/busybox); must be static")
    ap.add_argument(
        "--compression",
        choices=["mixed", "none", "gzip"],
        default="mixed",
        help="mixed (default): layer1 gzip, the others uncompressed; none; gzip (all)",
    )
    args = ap.parse_args(argv)

    bb_path = find_busybox(args.busybox)
    busybox = bb_path.read_bytes()
    if b"/lib64/ld-linux" in busybox[:4096] or b"/lib/ld-linux" in busybox[:4096]:
        sys.exit(f"build_sample_image: {bb_path} is dynamically linked; install busybox-static")

    tars = [layer1(busybox), layer2(), layer3()]
    args.outdir.mkdir(parents=True, exist_ok=True)
    for old in args.outdir.glob("layer*.tar*"):
        old.unlink()

    manifest = []
    parent = None
    for i, data in enumerate(tars, start=1):
        gz = args.compression == "gzip" or (args.compression == "mixed" and i == 1)
        name = f"layer{i}.tar.gz" if gz else f"layer{i}.tar"
        blob = gzip_bytes(data) if gz else data
        tmp = args.outdir / (name + ".tmp")
        tmp.write_bytes(blob)
        tmp.replace(args.outdir / name)
        diff_id = sha256(data)
        cid = chain_id(parent, diff_id)
        manifest.append(
            {
                "file": name,
                "compression": "gzip" if gz else "none",
                "size": len(blob),
                "diff_id": diff_id,
                "chain_id": cid,
                "parent": parent,
            }
        )
        parent = cid
        print(f"{name} {diff_id} {cid}")

    (args.outdir / "manifest.json").write_text(
        json.dumps({"busybox": str(bb_path), "layers": manifest}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
