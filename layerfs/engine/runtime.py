"""Running containers: an OCI runtime bundle from an image, executed by runc (or crun).

``run`` is what ``layerfs run`` does::

    with layerfs.open_store(root) as store:
        status = run(store, ImageStore(store), "app:1", ["/bin/sh", "-c", "echo hi; exit 3"], rm=True)
        # prints "hi"; status == 3

It creates a container layer on the image's top layer, mounts it, writes a
runtime bundle (``<root>/engine/run/<name>/config.json``, see
:func:`runtime_spec`), runs ``runc run`` in the foreground with the caller's
stdio, and returns the container's exit status the way docker does: the
process's status, 128+N when a signal N killed it, 125 when the runtime
could not create the container, 126/127 when the command cannot be executed
or found.  The rootfs is unmounted and the bundle removed whatever happens;
``rm=True`` removes the container too.

The runtime keeps its state under ``<root>/engine/<runtime>`` (its own
``--root``), so it never sees or collides with containers of a system
runc/docker.  Containers get the cgroup ``layerfs/<name>-<store hash>``
*relative* to the caller's own cgroups, so whatever limits the caller runs
under also bound its containers.

Signals: SIGTERM (and, when runc is not in the terminal's foreground process
group, SIGINT/SIGHUP/SIGQUIT) are passed on to the runtime, which passes them
to the container.  A second SIGINT/SIGTERM kills the container (``runc delete
-f``).  Without a terminal, a container's PID 1 (e.g. ``sh``) ignores signals
it has no handler for, as under docker.

crun refuses hybrid cgroup hosts (cgroup v1 plus a cgroup2 mount at
``/sys/fs/cgroup/unified``); there every crun call runs in a private mount
namespace without the cgroup2 mount, as ENVIRONMENT.md describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..errors import InvalidLayer, InvalidOption, LayerfsError, NotFound

OCI_VERSION = "1.0.2"
RUNTIMES = ("runc", "crun")
NETWORKS = ("none", "host")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Docker's default capability set (moby oci/caps/defaults.go).
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

#: Docker's default masked and read-only paths (moby oci/defaults.go).
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel
_ENV_KEY_RE = re.compile(r"^[^=\x00]+$")
_USER_RE = re.compile(r"^[^:\s\x00]+(:[^:\s\x00]+)?$")


class RuntimeNotFound(LayerfsError):
    """No OCI runtime (runc, crun) of the requested name is installed."""


# -- users and groups of the image ----------------------------------------------------------
@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class UserDB:
    """The image's /etc/passwd and /etc/group (empty when the image has none)."""

    users: tuple[PasswdEntry, ...] = ()
    groups: tuple[GroupEntry, ...] = ()

    @classmethod
    def parse(cls, passwd: str = "", group: str = "") -> "UserDB":
        """From the text of passwd and group files (pure; malformed lines are skipped, like libc)."""
        users = []
        for line in passwd.splitlines():
            f = line.split(":")
            if len(f) < 7 or not f[0] or line.startswith(("#", "+", "-")):
                continue
            try:
                users.append(PasswdEntry(f[0], int(f[2]), int(f[3]), f[5]))
            except ValueError:
                continue
        groups = []
        for line in group.splitlines():
            f = line.split(":")
            if len(f) < 4 or not f[0] or line.startswith(("#", "+", "-")):
                continue
            try:
                groups.append(GroupEntry(f[0], int(f[2]), tuple(m for m in f[3].split(",") if m)))
            except ValueError:
                continue
        return cls(tuple(users), tuple(groups))

    @classmethod
    def load(cls, rootfs: str | os.PathLike) -> "UserDB":
        """Read ``/etc/passwd`` and ``/etc/group`` of *rootfs*; symlinks resolve inside it."""
        return cls.parse(read_file_in_root(rootfs, "/etc/passwd") or "", read_file_in_root(rootfs, "/etc/group") or "")


def read_file_in_root(root: str | os.PathLike, path: str, limit: int = 4 << 20) -> str | None:
    """Text of regular file *path* inside *root*, None when missing or not a regular file.

    Symlinks are resolved as if *root* were ``/`` (an image cannot make us
    read a file of the host), ``..`` stops at *root*.
    """
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dirs: list[int] = []  # open directory fds from root down to the current one
    try:
        cur = os.dup(rootfd)
        dirs.append(cur)
        parts = [p for p in path.split("/") if p not in ("", ".")]
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if len(dirs) > 1:
                    os.close(dirs.pop())
                continue
            try:
                st = os.stat(part, dir_fd=dirs[-1], follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > 40:
                    return None
                target = os.readlink(part, dir_fd=dirs[-1])
                if target.startswith("/"):
                    while len(dirs) > 1:
                        os.close(dirs.pop())
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            if parts:
                if not stat.S_ISDIR(st.st_mode):
                    return None
                dirs.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirs[-1]))
                continue
            if not stat.S_ISREG(st.st_mode):
                return None
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dirs[-1])
            with os.fdopen(fd, "rb") as f:
                return f.read(limit).decode("utf-8", "replace")
        return None
    finally:
        for fd in dirs:
            os.close(fd)
        os.close(rootfd)


def parse_user(spec: str) -> tuple[str, str | None]:
    """``UID[:GID]`` or ``NAME[:GROUP]`` -> (user, group or None); InvalidOption when malformed."""
    if not isinstance(spec, str) or not _USER_RE.match(spec):
        raise InvalidOption(f"--user {spec!r} is not UID[:GID] or NAME[:GROUP], e.g. 1000:1000")
    user, _, group = spec.partition(":")
    for part in (user, group):
        if part.isdigit() and int(part) > _MAX_ID:
            raise InvalidOption(f"--user {spec!r}: id {part} is out of range (0-{_MAX_ID})")
    return user, group or None


def _needs_userdb(spec: str | None) -> bool:
    if not spec:
        return True  # root: HOME and supplementary groups come from the image
    user, group = parse_user(spec)
    return not (user.isdigit() and group is not None and group.isdigit())


def resolve_user(spec: str | None, users: UserDB) -> dict:
    """Docker's rules: {"uid", "gid", "additionalGids", "home"} for *spec* (None = root).

    A numeric uid need not be in passwd (gid 0, HOME /); a name must be.
    Without a group, the primary gid comes from passwd and the user's other
    groups from /etc/group; with one, only that group.
    """
    user, group = parse_user(spec) if spec else ("0", None)
    if user.isdigit():
        uid = int(user)
        entry = next((u for u in users.users if u.uid == uid), None)
    else:
        entry = next((u for u in users.users if u.name == user), None)
        if entry is None:
            raise InvalidOption(f"user {user!r} is not in the image's /etc/passwd; give a numeric --user UID[:GID]")
        uid = entry.uid
    gid = entry.gid if entry else 0
    extra: list[int] = []
    if group is None:
        if entry is not None:
            for g in users.groups:
                if entry.name in g.members and g.gid != gid and g.gid not in extra:
                    extra.append(g.gid)
    elif group.isdigit():
        gid = int(group)
    else:
        g = next((g for g in users.groups if g.name == group), None)
        if g is None:
            raise InvalidOption(f"group {group!r} is not in the image's /etc/group; give a numeric GID")
        gid = g.gid
    for value in (uid, gid, *extra):
        if not 0 <= value <= _MAX_ID:
            raise InvalidOption(f"user {spec!r}: id {value} is out of range (0-{_MAX_ID})")
    return {"uid": uid, "gid": gid, "additionalGids": extra, "home": entry.home if entry and entry.home else "/"}


# -- the runtime spec -----------------------------------------------------------------------
def _string_list(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidLayer(f"image config: {what} must be a list of strings, not {value!r}")
    return list(value)


def container_config_of(image_config: Mapping) -> Mapping:
    """The ``config`` object of an image config; a whole image config document is accepted too."""
    if not isinstance(image_config, Mapping):
        raise InvalidLayer("image config: the container config is not a JSON object")
    inner = image_config.get("config")
    if isinstance(inner, Mapping) and ("rootfs" in image_config or "architecture" in image_config):
        return inner
    return image_config


def command(image_config: Mapping, args: Sequence[str] | None = None) -> list[str]:
    """Entrypoint + Cmd; *args* (when non-empty) replace Cmd and keep Entrypoint."""
    cfg = container_config_of(image_config)
    entrypoint = _string_list(cfg.get("Entrypoint"), "Entrypoint")
    cmd = list(args) if args else _string_list(cfg.get("Cmd"), "Cmd")
    out = entrypoint + cmd
    if not out:
        raise InvalidOption("no command to run: the image has no Entrypoint or Cmd; give one after the image name")
    if not out[0]:
        raise InvalidOption("the command is an empty string; give a program to run")
    for a in out:
        if not isinstance(a, str) or "\x00" in a:
            raise InvalidOption(f"command argument {a!r} is not a string without NUL bytes")
    return out


def check_env(env: Iterable[str]) -> list[str]:
    """Validate ``--env KEY=VALUE`` items."""
    out = []
    for item in env:
        key, sep, _ = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not sep or not _ENV_KEY_RE.match(key) or "\x00" in item:
            raise InvalidOption(f"--env {item!r} is not KEY=VALUE (e.g. --env FOO=bar)")
        out.append(item)
    return out


def merge_env(image_env: Iterable[str], user_env: Iterable[str], *, hostname: str | None = None,
              terminal: bool = False, home: str | None = None) -> list[str]:
    """PATH (default), HOSTNAME, TERM, then the image's Env, then --env; a later value wins in place."""
    merged: dict[str, str] = {"PATH": f"PATH={DEFAULT_PATH}"}
    if hostname:
        merged["HOSTNAME"] = f"HOSTNAME={hostname}"
    if terminal:
        merged["TERM"] = "TERM=xterm"
    for item in _string_list(list(image_env) if image_env is not None else None, "Env"):
        if "\x00" in item:
            raise InvalidLayer(f"image config: Env entry {item!r} contains a NUL byte")
        merged[item.partition("=")[0]] = item
    for item in check_env(user_env):
        merged[item.partition("=")[0]] = item
    if home and "HOME" not in merged:
        merged["HOME"] = f"HOME={home}"
    return list(merged.values())


def check_workdir(workdir: str) -> str:
    if not isinstance(workdir, str) or not workdir.startswith("/") or "\x00" in workdir:
        raise InvalidOption(f"--workdir {workdir!r} is not an absolute path (e.g. /app)")
    return os.path.normpath(workdir).replace("//", "/")


def _cwd(cfg: Mapping, workdir: str | None) -> str:
    if workdir:
        return check_workdir(workdir)
    image_wd = cfg.get("WorkingDir") or ""
    if not isinstance(image_wd, str) or "\x00" in image_wd:
        raise InvalidLayer(f"image config: WorkingDir {image_wd!r} is not a path")
    return os.path.normpath("/" + image_wd.lstrip("/")).replace("//", "/") if image_wd else "/"


def _loopback_hook() -> dict:
    # A createRuntime hook (runs on the host once the namespaces exist) that
    # sets `lo` up in the container's new network namespace, as docker's
    # "none" network has it.  Python from the standard library only.
    code = (
        "import ctypes,fcntl,json,os,socket,struct,sys\n"
        "pid=json.load(sys.stdin)['pid']\n"
        "fd=os.open('/proc/%d/ns/net'%pid,os.O_RDONLY|os.O_CLOEXEC)\n"
        "libc=ctypes.CDLL(None,use_errno=True)\n"
        "if libc.setns(fd,0x40000000)!=0: sys.exit('layerfs: setns: '+os.strerror(ctypes.get_errno()))\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "req=struct.pack('16sH',b'lo',0)+bytes(22)\n"
        "flags=struct.unpack('16sH',fcntl.ioctl(s,0x8913,req)[:18])[1]\n"  # SIOCGIFFLAGS
        "fcntl.ioctl(s,0x8914,struct.pack('16sH',b'lo',flags|1)+bytes(22))\n"  # SIOCSIFFLAGS, IFF_UP
    )
    python = sys.executable or "/usr/bin/python3"
    return {"path": python, "args": [python, "-I", "-S", "-c", code], "timeout": 10}


def _mounts() -> list[dict]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    ]


def runtime_spec(
    image_config: Mapping,
    rootfs: str | os.PathLike,
    *,
    args: Sequence[str] | None = None,
    env: Iterable[str] = (),
    workdir: str | None = None,
    user: str | None = None,
    hostname: str = "layerfs",
    network: str = "none",
    terminal: bool = False,
    users: UserDB | None = None,
    cgroups_path: str | None = None,
    loopback: bool = True,
    extra_mounts: Sequence[Mapping] = (),
) -> dict:
    """An OCI runtime-spec config.json (as a dict) for running the image at *rootfs*.

    *image_config* is the image config's ``config`` object (Entrypoint, Cmd,
    Env, WorkingDir, User).  Pure except that resolving a user reads the
    image's /etc/passwd and /etc/group from *rootfs* (:meth:`UserDB.load`)
    unless *users* is given or the user is a numeric ``UID:GID``.
    """
    cfg = container_config_of(image_config)
    if network not in NETWORKS:
        raise InvalidOption(f"--network {network!r} is not one of: {', '.join(NETWORKS)}")
    if not isinstance(hostname, str) or not 0 < len(hostname.encode()) <= 64 or "\x00" in hostname:
        raise InvalidOption(f"hostname {hostname!r} must be 1-64 bytes")
    argv = command(cfg, args)
    user_env = check_env(env)
    cwd = _cwd(cfg, workdir)
    image_user = cfg.get("User") or None
    if image_user is not None and not isinstance(image_user, str):
        raise InvalidLayer(f"image config: User {image_user!r} is not a string")
    spec_user = user if user else image_user
    if spec_user:
        try:
            parse_user(spec_user)
        except InvalidOption:
            if user:
                raise
            raise InvalidLayer(f"image config: User {image_user!r} is not UID[:GID] or NAME[:GROUP]") from None
    if users is None:
        users = UserDB.load(rootfs) if _needs_userdb(spec_user) else UserDB()
    ids = resolve_user(spec_user, users)
    process_user = {"uid": ids["uid"], "gid": ids["gid"], "umask": 0o022}
    if ids["additionalGids"]:
        process_user["additionalGids"] = ids["additionalGids"]
    caps = list(DEFAULT_CAPABILITIES)
    namespaces = [{"type": t} for t in ("pid", "mount", "ipc", "uts")]
    if network == "none":
        namespaces.append({"type": "network"})
    spec = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": bool(terminal),
            "user": process_user,
            "args": argv,
            "env": merge_env(cfg.get("Env"), user_env, hostname=hostname, terminal=terminal, home=ids["home"]),
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": list(caps), "permitted": list(caps)},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": os.fspath(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": _mounts() + [dict(m) for m in extra_mounts],
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        },
    }
    if cgroups_path:
        spec["linux"]["cgroupsPath"] = cgroups_path
    if network == "none" and loopback:
        spec["hooks"] = {"createRuntime": [_loopback_hook()]}
    return spec


def host_network_mounts(rootfs: str | os.PathLike) -> list[dict]:
    """With ``--network host``: the host's resolv.conf and hosts, read-only, over the image's own files.

    Only where the image has a regular file there (so nothing is created in the container layer).
    """
    out = []
    for path in ("/etc/resolv.conf", "/etc/hosts"):
        if os.path.isfile(path) and read_file_in_root(rootfs, path, limit=0) is not None:
            out.append({"destination": path, "type": "bind", "source": os.path.realpath(path),
                        "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})
    return out


# -- the runtime -------------------------------------------------------------------------------
def find_runtime(name: str = "runc") -> str:
    """Path of the OCI runtime *name* (runc or crun); RuntimeNotFound when it is not installed."""
    if name not in RUNTIMES:
        raise InvalidOption(f"--runtime {name!r} is not one of: {', '.join(RUNTIMES)}")
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    path = shutil.which(name, path=search)
    if path is None:
        raise RuntimeNotFound(f"no OCI runtime {name!r} is installed; apt-get install {name} (or make setup)")
    return path


def hybrid_cgroup2_mounts() -> list[str]:
    """cgroup2 mount points beside cgroup v1 hierarchies (a "hybrid" host), else []."""
    v1, v2 = False, []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                if fields[2] == "cgroup":
                    v1 = True
                elif fields[2] == "cgroup2":
                    v2.append(fields[1].replace("\\040", " "))
    except OSError:
        return []
    return v2 if v1 else []


def runtime_command(runtime: str, path: str, state_root: str | os.PathLike, *argv: str, log: str | None = None) -> list[str]:
    """The command line of one runtime call (crun on a hybrid host: in a namespace without cgroup2)."""
    cmd = [path, "--root", os.fspath(state_root)]
    if log is not None:
        cmd += ["--log", log, "--log-format", "json"] if runtime == "runc" else [f"--log={log}", "--log-format=json"]
    cmd += list(argv)
    if runtime == "crun":
        hidden = hybrid_cgroup2_mounts()
        if hidden:
            unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin") or "unshare"
            script = " && ".join(f"umount {_sh_quote(m)}" for m in hidden) + ' && exec "$0" "$@"'
            cmd = [unshare, "-m", "--propagation", "private", "sh", "-c", script] + cmd
    return cmd


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _start_error_status(log: Path) -> int | None:
    """125/126/127 when the runtime logged that it could not start the container, else None."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    messages = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            messages.append(str(entry.get("msg", "")).lower())
    if not messages:
        return None
    text = " ".join(messages)
    if "exec" in text and "permission denied" in text:
        return 126
    if "exec" in text and ("not found" in text or "no such file" in text):
        return 127
    return 125


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _fd_of(stream, default: int) -> int:
    if stream is None:
        return default
    if isinstance(stream, int):
        return stream
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return -1


def _isatty(fd: int) -> bool:
    try:
        return fd >= 0 and os.isatty(fd)
    except OSError:
        return False


def _execute(cmd: list[str], *, stdin, stdout, stderr, own_group: bool, force_delete) -> int:
    """Run the runtime in the foreground; returns its raw exit status (128+N for a signal)."""
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr, process_group=0 if own_group else None)
    interrupts = 0
    installed: dict[int, object] = {}

    def on_signal(signum, _frame):
        nonlocal interrupts
        # runc passes signals on to the container.  In our own process group
        # it already got the keyboard's SIGINT/SIGQUIT (and a hangup).
        if own_group or signum == signal.SIGTERM:
            try:
                proc.send_signal(signum)
            except (ProcessLookupError, OSError):
                pass
        if signum in (signal.SIGINT, signal.SIGTERM):
            interrupts += 1
            if interrupts == 2:  # once: later ones must not disturb the forced delete
                raise _Interrupted(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            try:
                installed[sig] = signal.signal(sig, on_signal)
            except (OSError, ValueError):
                pass
    try:
        try:
            rc = proc.wait()
        except _Interrupted:
            force_delete()
            try:
                rc = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    except BaseException:
        force_delete()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)
    return 128 - rc if rc < 0 else rc


def _cgroup_path(store, name: str) -> str:
    tag = hashlib.sha256(os.fsencode(str(store.root))).hexdigest()[:8]
    return f"layerfs/{name}-{tag}"


def generate_name() -> str:
    return f"layerfs-{secrets.token_hex(4)}"


def run(
    store,
    images,
    image_name: str,
    args: Sequence[str] | None = None,
    *,
    name: str | None = None,
    rm: bool = False,
    env: Iterable[str] = (),
    workdir: str | None = None,
    user: str | None = None,
    runtime: str = "runc",
    network: str = "none",
    tty: bool | None = None,
    stdin=None,
    stdout=None,
    stderr=None,
) -> int:
    """Run *args* (or the image's command) in a new container of *image_name*; its exit status.

    *stdin*/*stdout*/*stderr* are passed to the runtime (None: inherit ours).
    *tty* None means a terminal exactly when stdin is one.  The container
    stays (with its changes) unless *rm*; it is removed anyway when it could
    not be set up (nothing ran in it).
    """
    # Everything checkable without a container first: a usage error creates nothing.
    runtime_path = find_runtime(runtime)
    if network not in NETWORKS:
        raise InvalidOption(f"--network {network!r} is not one of: {', '.join(NETWORKS)}")
    env = check_env(list(env))
    if workdir is not None:
        check_workdir(workdir)
    if user:
        parse_user(user)
    image = images.image(image_name)
    cfg = image.config.container
    command(cfg, args)
    if name is None:
        name = generate_name()
    stdin_fd = _fd_of(stdin, 0)
    stdin_tty = _isatty(stdin_fd)
    terminal = stdin_tty if tty is None else bool(tty)
    if terminal and not stdin_tty:
        raise InvalidOption("--tty needs a terminal on stdin (the input device is not a TTY); drop -t")

    engine = store.root / "engine"
    state_root = engine / runtime
    bundle = engine / "run" / name
    log = bundle / "runtime.log"
    store.create_container(name, image.top_chain)
    state = {"ran": False, "mounted": False}

    def runtime_call(*argv: str) -> None:
        subprocess.run(runtime_command(runtime, runtime_path, state_root, *argv), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def force_delete() -> None:
        if (state_root / name).exists():
            runtime_call("delete", "-f", name)

    def body() -> int:
        rootfs = store.mount(name)
        state["mounted"] = True
        hostname = socket.gethostname() if network == "host" else name[:63].rstrip(".-") or "layerfs"
        spec = runtime_spec(
            cfg, rootfs, args=args, env=env, workdir=workdir, user=user, hostname=hostname, network=network,
            terminal=terminal, cgroups_path=_cgroup_path(store, name),
            extra_mounts=host_network_mounts(rootfs) if network == "host" else (),
        )
        state_root.mkdir(parents=True, exist_ok=True)
        os.chmod(state_root, 0o700)
        force_delete()  # a state left behind by a killed run of a container of this name
        if bundle.exists():
            shutil.rmtree(bundle)
        bundle.mkdir(parents=True, mode=0o700)
        (bundle / "config.json").write_text(json.dumps(spec, indent=2))
        state["ran"] = True
        cmd = runtime_command(runtime, runtime_path, state_root, "run", "--bundle", str(bundle), name, log=str(log))
        status = _execute(cmd, stdin=stdin, stdout=stdout, stderr=stderr, own_group=not stdin_tty,
                          force_delete=force_delete)
        if status == 1:  # runc and crun exit 1 when they cannot start the container
            status = _start_error_status(log) or status
        return status

    def cleanup() -> LayerfsError | OSError | None:
        # Undo in reverse; go on when one step fails and return the first failure.
        failure = None
        for step in (
            force_delete,
            lambda: shutil.rmtree(bundle, ignore_errors=True),
            lambda: store.unmount(name) if state["mounted"] else None,
            lambda: store.remove_container(name, force=True) if (rm or not state["ran"]) else None,
        ):
            try:
                step()
            except NotFound:
                pass
            except (LayerfsError, OSError) as exc:
                failure = failure or exc
        return failure

    try:
        status = body()
    except BaseException:
        cleanup()
        raise
    failure = cleanup()
    if failure is not None:
        raise failure
    return status
