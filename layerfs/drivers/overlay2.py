"""overlay2: layers as plain directories, a rootfs as a kernel overlayfs mount.

On disk, under ``<root>/overlay2``::

    <id>/diff       the layer's files; whiteouts as char 0:0, opaque dirs by xattr
    <id>/work       overlay's work dir (writable layers only)
    <id>/merged     where the layer's view is mounted
    <id>/lower      parent chain ids, nearest first (absent for a base layer)
    <id>/link       the short name of diff in l/ (for the legacy mount path)
    l/<short>       symlink to ../<id>/diff
    empty/          an empty directory: overlay needs two lowers without an upper
    trash/          directories being deleted (finished by cleanup after a crash)
    probes.json     cached feature probes for this kernel

Mounts use the new mount API with one ``lowerdir+`` per layer (Linux >= 6.8)
so depth is bounded by the kernel (500), not by a page of mount options.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import secrets
import shutil
import stat
import subprocess
from pathlib import Path
from typing import BinaryIO

from .. import _mountapi, archive, whiteout
from ..changes import Change, OverlayLowers, overlay_changes, walk_upper
from ..errors import DriverUnavailable, InvalidOption
from . import DirectoryLayers, Driver, parse_size, remove_tree
from ._quota import ProjectQuota

OVERLAY_MAX_STACK = 500
_RESERVED = {"l", "empty", "trash"}
_MOUNT_OPTS = (("index", "off"), ("redirect_dir", "off"), ("metacopy", "off"))
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}
_DT_UNKNOWN = 0


def has_dtype(directory: Path) -> bool:
    """True when readdir on *directory*'s filesystem fills in d_type."""
    probe = Path(directory) / f".dtype-{secrets.token_hex(4)}"
    probe.mkdir()
    try:
        (probe / "f").touch()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        buf = ctypes.create_string_buffer(4096)
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECTORY)
        try:
            n = libc.syscall(_SYS_GETDENTS64[platform.machine()], fd, buf, len(buf))
        finally:
            os.close(fd)
        if n < 0:
            raise OSError(ctypes.get_errno(), "getdents64")
        raw = buf.raw[:n]
        off = 0
        while off < n:
            reclen = int.from_bytes(raw[off + 16 : off + 18], "little")
            d_type = raw[off + 18]
            if d_type == _DT_UNKNOWN:
                return False
            off += reclen
        return True
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _fs_type(path: Path) -> str:
    """Filesystem type holding *path* (from mountinfo: the longest matching mount point)."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            point = os.fsdecode(_mountapi._unescape_mountinfo(left.split(b" ")[4]))
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, right.split(b" ")[0].decode()
    return fstype


class Overlay2Driver(DirectoryLayers, Driver):
    reserved_names = frozenset(_RESERVED)
    name = "overlay2"
    priority = 10
    whiteout_format = archive.WhiteoutFormat.OVERLAY
    max_depth = OVERLAY_MAX_STACK
    parallel_apply = True
    options = {
        "overlay2.size": "default size limit of a container's writable layer (xfs with pquota only), e.g. 10G",
        "overlay2.mountapi": "auto (default), new (fsopen + lowerdir+) or legacy (mount(2) with short links)",
    }

    def __init__(self, home: Path, options):
        super().__init__(home, options)
        self.features = self.probe(self.home)
        mode = self.opts.get("overlay2.mountapi", "auto")
        if mode == "new" and not self.features["lowerdir_plus"]:
            raise DriverUnavailable("overlay2.mountapi=new: this kernel has no overlay lowerdir+ (needs Linux >= 6.8)")
        self.use_new_api = self.features["lowerdir_plus"] and mode != "legacy"
        for fixed in _RESERVED:
            (self.home / fixed).mkdir(exist_ok=True)
        self.quota = ProjectQuota(self.home)
        self.default_size = None
        if "overlay2.size" in self.opts:
            self.default_size = parse_size(self.opts["overlay2.size"], "overlay2.size")
            self._require_quota("overlay2.size")

    @classmethod
    def validate_options(cls, options):
        opts = super().validate_options(options)
        if "overlay2.size" in opts:
            parse_size(opts["overlay2.size"], "overlay2.size")
        mode = opts.get("overlay2.mountapi", "auto")
        if mode not in ("auto", "new", "legacy"):
            raise InvalidOption(f"overlay2.mountapi={mode!r}: use auto, new or legacy")
        return opts

    # -- probes --------------------------------------------------------------
    @classmethod
    def probe(cls, home: Path) -> dict:
        """Check that overlay2 works at *home*; cached per kernel in probes.json."""
        home = Path(home)
        cache = home / "probes.json"
        kernel = os.uname().release
        try:
            cached = json.loads(cache.read_text())
            if cached.get("kernel") == kernel:
                return cached
        except (FileNotFoundError, ValueError):
            pass
        if os.geteuid() != 0:
            raise DriverUnavailable("overlay2 needs root (CAP_SYS_ADMIN) to mount; run as root or use another driver")
        home.mkdir(parents=True, exist_ok=True)
        fstype = _fs_type(home)
        if not has_dtype(home):
            raise DriverUnavailable(
                f"overlay2: the backing filesystem of {home} ({fstype}) does not report d_type; "
                "reformat it with d_type support (xfs: mkfs.xfs -n ftype=1, ext4: keep the filetype feature) "
                "or point --root elsewhere"
            )
        if fstype in ("overlay", "aufs"):
            raise DriverUnavailable(f"overlay2: {home} is itself on {fstype}; overlay cannot stack on it here (use aufs)")
        features = {"kernel": kernel, "backing_fs": fstype, "d_type": True}
        scratch = home / f".probe-{secrets.token_hex(4)}"
        try:
            for sub in ("l1", "l2", "upper", "work", "merged"):
                (scratch / sub).mkdir(parents=True)
            (scratch / "l1" / "d").mkdir()
            (scratch / "l1" / "d" / "f").write_bytes(b"x" * 10)
            features.update(cls._probe_mounts(scratch))
        finally:
            if _mountapi.is_mountpoint(str(scratch / "merged")):
                _mountapi.umount(str(scratch / "merged"), _mountapi.MNT_DETACH)
            shutil.rmtree(scratch, ignore_errors=True)
        quota_ok, quota_why = ProjectQuota(home).supported() if fstype == "xfs" else (False, f"{fstype} has no project quotas; needs xfs with -o pquota")
        features["project_quota"] = quota_ok
        features["project_quota_detail"] = quota_why
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(features, indent=1))
        os.replace(tmp, cache)
        return features

    @staticmethod
    def _probe_mounts(scratch: Path) -> dict:
        merged = str(scratch / "merged")
        lowers = [str(scratch / "l1"), str(scratch / "l2")]
        upper, work = str(scratch / "upper"), str(scratch / "work")
        out = {"overlay": False, "lowerdir_plus": False, "native_diff": False}
        try:
            # Create a superblock, not just set the key: before Linux 6.8 overlay
            # takes unknown keys as legacy options and refuses them only here.
            with _mountapi.FsContext("overlay") as ctx:
                for lower in lowers:
                    ctx.set_string("lowerdir+", lower)
                ctx.create()
                out["lowerdir_plus"] = True
        except OSError:
            pass
        data = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
        try:
            _mountapi.mount("overlay", merged, "overlay", 0, data + "," + ",".join(f"{k}={v}" for k, v in _MOUNT_OPTS))
            forced_opts = True
        except OSError:
            try:
                _mountapi.mount("overlay", merged, "overlay", 0, data)
                forced_opts = False
            except OSError as exc:
                raise DriverUnavailable(
                    f"overlay2: the kernel refused an overlay mount on {scratch.parent} ({exc.strerror}); "
                    "load the overlay module or use the aufs driver"
                ) from None
        out["overlay"] = True
        try:
            # Native diff reads only the upper dir: it is right only when
            # overlay keeps no redirects and no metadata-only copy-ups.
            os.chmod(os.path.join(merged, "d", "f"), 0o600)
            metacopy = os.path.exists(os.path.join(upper, "d", "f")) and os.path.getsize(os.path.join(upper, "d", "f")) != 10
            try:
                os.rename(os.path.join(merged, "d"), os.path.join(merged, "d2"))
                redirect = True
            except OSError as exc:
                redirect = exc.errno != errno.EXDEV
            out["native_diff"] = forced_opts and not metacopy and not redirect
        finally:
            _mountapi.umount(merged, _mountapi.MNT_DETACH)
        return out

    def _require_quota(self, what: str) -> None:
        if not self.features.get("project_quota"):
            raise InvalidOption(f"{what}: {self.features.get('project_quota_detail')}")

    # -- layout helpers --------------------------------------------------------
    def _lower_ids(self, id: str) -> list[str]:
        try:
            text = (self._dir(id) / "lower").read_text()
        except FileNotFoundError:
            return []
        return [line for line in text.split("\n") if line]

    def layer_dirs(self, id: str) -> list[str]:
        """diff dirs of *id*'s parent chain, nearest first."""
        return [str(self.home / lid / "diff") for lid in self._lower_ids(id)]

    # -- Driver protocol ---------------------------------------------------------
    def create(self, id: str, parent: str | None, *, writable: bool = False, size: int | None = None) -> None:
        if size is None and writable:
            size = self.default_size
        if size is not None:
            if not writable:
                raise InvalidOption("a size limit applies to containers, not to image layers")
            self._require_quota("container size")
        d = self._dir(id)
        d.mkdir(mode=0o700)
        (d / "diff").mkdir(mode=0o755)
        os.chmod(d / "diff", 0o755)
        (d / "merged").mkdir(mode=0o700)
        if writable:
            (d / "work").mkdir(mode=0o700)
        if parent is not None:
            chain = [parent] + self._lower_ids(parent)
            (d / "lower").write_text("\n".join(chain) + "\n")
        link = secrets.token_hex(5)
        # The name first: remove() finds the symlink through it, even after a crash here.
        (d / "link").write_text(link)
        os.symlink(f"../{id}/diff", self.home / "l" / link)
        if size is not None:
            self.quota.set_limit(d / "diff", size)

    def remove(self, id: str) -> None:
        self.put(id)
        d = self._dir(id)
        try:
            link = (d / "link").read_text().strip()
        except FileNotFoundError:
            link = ""
        if link and "/" not in link:
            (self.home / "l" / link).unlink(missing_ok=True)
        trash = self.home / "trash"
        try:
            # Why: a rename makes the layer vanish at once; a crash during the
            # slow rmtree leaves only trash, which cleanup() finishes.
            target = trash / f"{id}-{secrets.token_hex(3)}"
            os.rename(d, target)
        except FileNotFoundError:
            return
        remove_tree(str(target))

    def is_mounted(self, id: str) -> bool:
        return _mountapi.is_mountpoint(str(self._dir(id) / "merged"))

    def get(self, id: str, *, readonly: bool = False) -> Path:
        d = self._dir(id)
        merged = d / "merged"
        if _mountapi.is_mountpoint(str(merged)):
            return merged
        if not (d / "diff").is_dir():
            raise FileNotFoundError(errno.ENOENT, f"overlay2 layer {id} has no directory", str(d))
        writable = (d / "work").is_dir() and not readonly
        lowers = self.layer_dirs(id)
        upper = None
        if writable:
            upper = str(d / "diff")
        else:
            lowers.insert(0, str(d / "diff"))
        if len(lowers) < (1 if writable else 2):
            lowers.append(str(self.home / "empty"))  # overlay needs 2 lowers without an upper
        if self.use_new_api:
            self._mount_new(merged, lowers, upper, str(d / "work"), readonly)
        else:
            self._mount_legacy(id, merged, upper, str(d / "work"), readonly, writable)
        return merged

    def _mount_new(self, merged: Path, lowers: list[str], upper: str | None, work: str, readonly: bool) -> None:
        with _mountapi.FsContext("overlay") as ctx:
            for lower in lowers:
                ctx.set_string("lowerdir+", lower)
            if upper is not None:
                ctx.set_string("upperdir", upper)
                ctx.set_string("workdir", work)
            for key, value in _MOUNT_OPTS:
                ctx.set_string(key, value)
            ctx.create()
            ctx.mount_at(str(merged), readonly=readonly)

    def _mount_legacy(self, id: str, merged: Path, upper: str | None, work: str, readonly: bool, writable: bool) -> None:
        # Short links keep the option string small: l/<10 hex> per layer.
        chain = self._lower_ids(id) if writable else [id] + self._lower_ids(id)
        links = [f"l/{(self.home / lid / 'link').read_text().strip()}" for lid in chain]
        if len(links) < (1 if writable else 2):
            links.append("empty")
        opts = f"lowerdir={':'.join(links)}"
        if upper is not None:
            opts += f",upperdir={upper},workdir={work}"
        opts += "," + ",".join(f"{k}={v}" for k, v in _MOUNT_OPTS)
        if readonly:
            opts = "ro," + opts
        page = os.sysconf("SC_PAGE_SIZE")
        if len(opts) >= page:
            raise DriverUnavailable(
                f"overlay2: {len(chain)} layers do not fit in one page of legacy mount options; "
                "use a kernel with overlay lowerdir+ (Linux >= 6.8) and overlay2.mountapi=auto"
            )
        # Relative lower paths resolve against the mounting process's cwd, so
        # mount(8) runs with cwd=home rather than chdir-ing this process.
        proc = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
            cwd=self.home, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise OSError(errno.EINVAL, f"overlay mount of {id} failed: {proc.stderr.strip()}")

    def put(self, id: str) -> None:
        _mountapi.unmount_retrying(str(self._dir(id) / "merged"))

    def status(self) -> dict:
        info = {k: v for k, v in self.features.items() if k != "kernel"}
        info["mount_api"] = "new (lowerdir+)" if self.use_new_api else "legacy (mount(2), short links)"
        return info

    def cleanup(self, repair: bool = True, deep: bool = False) -> list[str]:
        found = []
        trash = self.home / "trash"
        for name in os.listdir(trash) if trash.is_dir() else []:
            found.append(f"overlay2 trash holds an unfinished deletion ({name})")
            if repair:
                remove_tree(str(trash / name))
        if deep:
            links = self.home / "l"
            for name in os.listdir(links) if links.is_dir() else []:
                if not os.path.exists(links / name):  # dangling: its layer is gone
                    found.append(f"overlay2 short link l/{name} points at a removed layer")
                    if repair:
                        (links / name).unlink(missing_ok=True)
        return found

    # -- native diff (apply: DirectoryLayers) -------------------------------------

    def finish_apply(self, id: str, result: archive.ApplyResult) -> None:
        # Why drop whiteouts that hide nothing: overlayfs lists them, in a
        # directory no lower layer shares, as names that cannot be opened.
        if not result.whiteouts:
            return
        lowers = OverlayLowers(self.layer_dirs(id))
        diff = self._dir(id) / "diff"
        for rel in result.whiteouts:
            if lowers.lstat("/" + rel) is None:
                os.unlink(diff / rel)

    def changes(self, id: str, parent: str | None) -> list[Change]:
        if not self.features.get("native_diff"):
            return super().changes(id, parent)
        return overlay_changes(str(self._dir(id) / "diff"), OverlayLowers(self.layer_dirs(id)))

    def export(self, id: str, parent: str | None, out: BinaryIO) -> str:
        if not self.features.get("native_diff"):
            return super().export(id, parent, out)
        upper = str(self._dir(id) / "diff")
        exporter = archive.TarExporter(out)
        for rel, entry, st in walk_upper(upper):
            name = rel[1:]
            if whiteout.is_overlay_whiteout(st.st_mode, st.st_rdev):
                exporter.whiteout(name)
                continue
            exporter.add(name, entry.path, st)
            if stat.S_ISDIR(st.st_mode):
                try:
                    opaque = os.getxattr(entry.path, whiteout.OVERLAY_OPAQUE_XATTR, follow_symlinks=False)
                except OSError:
                    opaque = None
                if whiteout.is_overlay_opaque(opaque):
                    exporter.opaque(name)
        return exporter.close()
