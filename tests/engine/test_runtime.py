"""Running containers: the OCI runtime spec (pure) and real runs under runc (and crun where installed)."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from layerfs import Change, _mountapi
from layerfs.engine import runtime as rt
from layerfs.engine.cli_run import add_run_command
from layerfs.errors import InvalidLayer, InvalidOption, LayerfsError, NotFound



def mounts_under(path) -> list[str]:
    return _mountapi.mounts_under(str(path))

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = ("sh", "echo", "cat", "id", "pwd", "ls", "sleep", "touch", "mkdir", "ip", "env", "kill", "true", "wc")
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nwheel:x:10:root\n"


# -- runtime_spec: pure ------------------------------------------------------------------------
def spec(cfg=None, rootfs="/nonexistent-rootfs", **kw):
    kw.setdefault("users", rt.UserDB.parse(PASSWD, GROUP))
    return rt.runtime_spec(cfg if cfg is not None else {"Cmd": ["/bin/sh"]}, rootfs, **kw)


@pytest.mark.parametrize(
    "cfg, args, expected",
    [
        ({"Cmd": ["/bin/sh", "-c", "x"]}, None, ["/bin/sh", "-c", "x"]),
        ({"Cmd": ["/bin/sh"]}, ["echo", "hi"], ["echo", "hi"]),
        ({"Entrypoint": ["/bin/ep", "-v"], "Cmd": ["default"]}, None, ["/bin/ep", "-v", "default"]),
        ({"Entrypoint": ["/bin/ep"], "Cmd": ["default"]}, ["mine", "two"], ["/bin/ep", "mine", "two"]),
        ({"Entrypoint": ["/bin/ep"]}, None, ["/bin/ep"]),
        ({"Entrypoint": ["/bin/ep"], "Cmd": None}, [], ["/bin/ep"]),
        ({"Cmd": ["/bin/sh"]}, [], ["/bin/sh"]),  # no CMD given: the image's
        ({}, ["/bin/true"], ["/bin/true"]),
        ({"Cmd": "/bin/sh"}, None, ["/bin/sh"]),  # a string is one argument
    ],
)
def test_command_is_entrypoint_plus_cmd(cfg, args, expected):
    assert spec(cfg, args=args)["process"]["args"] == expected


@pytest.mark.parametrize("cfg, args", [({}, None), ({"Cmd": []}, []), ({"Entrypoint": None, "Cmd": None}, None), ({}, [""])])
def test_empty_command_is_an_error(cfg, args):
    with pytest.raises(InvalidOption) as e:
        spec(cfg, args=args)
    assert "\n" not in str(e.value)


def test_malformed_image_command_is_an_image_error():
    with pytest.raises(InvalidLayer, match="Cmd"):
        spec({"Cmd": [1, 2]})
    with pytest.raises(InvalidLayer, match="Entrypoint"):
        spec({"Entrypoint": {"a": 1}})


def test_whole_image_config_document_is_accepted():
    doc = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
           "config": {"Cmd": ["/bin/true"], "WorkingDir": "/srv"}}
    s = spec(doc)
    assert s["process"]["args"] == ["/bin/true"] and s["process"]["cwd"] == "/srv"


def env_dict(s) -> dict:
    return dict(e.split("=", 1) for e in s["process"]["env"])


def test_env_default_path_hostname_and_home():
    s = spec({"Cmd": ["x"]}, hostname="box")
    env = env_dict(s)
    assert env["PATH"] == rt.DEFAULT_PATH
    assert env["HOSTNAME"] == "box"
    assert env["HOME"] == "/root"  # from the image's passwd
    assert "TERM" not in env
    assert env_dict(spec({"Cmd": ["x"]}, terminal=True))["TERM"] == "xterm"


def test_env_merge_later_wins_in_place():
    cfg = {"Cmd": ["x"], "Env": ["PATH=/img/bin", "A=image", "B=image", "HOME=/h"]}
    s = spec(cfg, env=["B=user", "C=new", "B=last", "EMPTY="])
    env = s["process"]["env"]
    assert env.index("PATH=/img/bin") < env.index("A=image") < env.index("B=last") < env.index("C=new")
    d = env_dict(s)
    assert d == {"PATH": "/img/bin", "HOSTNAME": "layerfs", "A": "image", "B": "last", "HOME": "/h", "C": "new", "EMPTY": ""}
    assert [e for e in env if e.startswith("B=")] == ["B=last"]


def test_env_value_may_contain_equals_signs():
    assert env_dict(spec(env=["URL=a=b=c"]))["URL"] == "a=b=c"


@pytest.mark.parametrize("bad", ["FOO", "=value", "", "A\x00B=1", "A=\x00"])
def test_bad_env_is_an_error(bad):
    with pytest.raises(InvalidOption, match="--env") as e:
        spec(env=[bad])
    assert "\n" not in str(e.value)


def test_workdir():
    assert spec({"Cmd": ["x"]})["process"]["cwd"] == "/"
    assert spec({"Cmd": ["x"], "WorkingDir": "/srv/app/"})["process"]["cwd"] == "/srv/app"
    assert spec({"Cmd": ["x"], "WorkingDir": "relative"})["process"]["cwd"] == "/relative"
    assert spec({"Cmd": ["x"], "WorkingDir": "/srv"}, workdir="/opt//x/../y")["process"]["cwd"] == "/opt/y"
    for bad in ("relative", "", "/a\x00b"):
        if bad == "":
            assert spec(workdir=bad)["process"]["cwd"] == "/"  # empty: not given
            continue
        with pytest.raises(InvalidOption, match="--workdir"):
            spec(workdir=bad)


def user_of(**kw) -> dict:
    return spec(**kw)["process"]["user"]


def test_user_numeric_needs_no_lookup(tmp_path):
    # A numeric UID:GID does not read the rootfs at all (it does not even exist).
    s = rt.runtime_spec({"Cmd": ["x"]}, tmp_path / "missing", user="123:456")
    assert s["process"]["user"] == {"uid": 123, "gid": 456, "umask": 0o022}
    assert env_dict(s)["HOME"] == "/"


def test_user_defaults_to_root_with_its_groups():
    u = user_of()
    assert (u["uid"], u["gid"], u["additionalGids"]) == (0, 0, [10])


def test_user_uid_only_takes_gid_and_groups_from_passwd():
    u = user_of(user="1000")
    assert (u["uid"], u["gid"], u["additionalGids"]) == (1000, 1000, [2000])
    unknown = user_of(user="4242")  # not in passwd: gid 0, no groups
    assert (unknown["uid"], unknown["gid"], unknown.get("additionalGids")) == (4242, 0, None)


def test_user_names_and_groups():
    u = user_of(user="app")
    assert (u["uid"], u["gid"], u["additionalGids"]) == (1000, 1000, [2000])
    u = user_of(user="app:extra")  # an explicit group: only that one
    assert (u["uid"], u["gid"], u.get("additionalGids")) == (1000, 2000, None)
    u = user_of(user="app:77")
    assert (u["uid"], u["gid"]) == (1000, 77)
    u = user_of(user="5:wheel")
    assert (u["uid"], u["gid"]) == (5, 10)
    assert env_dict(spec(user="app"))["HOME"] == "/home/app"


def test_image_user_applies_unless_overridden():
    assert user_of(cfg={"Cmd": ["x"], "User": "app"})["uid"] == 1000
    assert user_of(cfg={"Cmd": ["x"], "User": "app"}, user="0:0")["uid"] == 0
    with pytest.raises(InvalidLayer, match="User"):
        spec({"Cmd": ["x"], "User": "a:b:c"})


@pytest.mark.parametrize("bad", ["a:b:c", ":1", "1:", " 1", "1 ", "x y", "4294967295", "1:4294967296", "\x00"])
def test_bad_user_syntax_is_an_error(bad):
    with pytest.raises(InvalidOption, match="--user") as e:
        spec(user=bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad, what", [("nobody", "passwd"), ("app:nogroup", "group"), ("1000:nogroup", "group")])
def test_unknown_user_or_group_name_is_an_error(bad, what):
    with pytest.raises(InvalidOption, match=what):
        spec(user=bad)


def test_user_names_are_read_from_the_rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(PASSWD + "# comment\nbroken line\nweb:x:33:33::/var/www:/bin/sh\n")
    (root / "etc/group").write_text(GROUP + "www:x:33:\n")
    s = rt.runtime_spec({"Cmd": ["x"]}, root, user="web:extra")
    assert s["process"]["user"]["uid"] == 33 and s["process"]["user"]["gid"] == 2000
    assert env_dict(s)["HOME"] == "/var/www"
    # without passwd/group files: numeric works, names do not
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rt.runtime_spec({"Cmd": ["x"]}, empty, user="7")["process"]["user"]["gid"] == 0
    with pytest.raises(InvalidOption, match="passwd"):
        rt.runtime_spec({"Cmd": ["x"]}, empty, user="web")


def test_passwd_symlinks_resolve_inside_the_rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data/pw").write_text("inside:x:77:78::/in:/bin/sh\n")
    # An absolute symlink means the rootfs's /data/pw, never the host's.
    (root / "etc/passwd").symlink_to("/data/pw")
    (root / "etc/group").symlink_to("../../../../../../../etc/group")  # clamps at the rootfs: missing
    assert rt.UserDB.load(root).users == (rt.PasswdEntry("inside", 77, 78, "/in"),)
    assert rt.UserDB.load(root).groups == ()
    (root / "etc/loop").symlink_to("loop")
    assert rt.read_file_in_root(root, "/etc/loop") is None
    assert rt.read_file_in_root(root, "/etc/passwd/x") is None
    assert rt.read_file_in_root(root, "/data") is None  # a directory


def test_namespaces_and_network():
    kinds = lambda s: [n["type"] for n in s["linux"]["namespaces"]]  # noqa: E731
    none = spec()
    assert kinds(none) == ["pid", "mount", "ipc", "uts", "network"]
    assert all("path" not in n for n in none["linux"]["namespaces"])
    hook = none["hooks"]["createRuntime"][0]
    assert os.path.isabs(hook["path"]) and hook["args"][0] == hook["path"]
    host = spec(network="host")
    assert kinds(host) == ["pid", "mount", "ipc", "uts"]
    assert "hooks" not in host
    assert "hooks" not in spec(loopback=False)
    with pytest.raises(InvalidOption, match="--network"):
        spec(network="bridge")


def test_spec_shape_like_docker_defaults():
    s = spec(cgroups_path="layerfs/x", hostname="box", extra_mounts=[{"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts"}])
    json.dumps(s)  # serializable
    assert s["ociVersion"] == "1.0.2"
    assert s["root"] == {"path": "/nonexistent-rootfs", "readonly": False}
    assert s["hostname"] == "box"
    p = s["process"]
    assert p["terminal"] is False and p["noNewPrivileges"] is True
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    caps = p["capabilities"]
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == list(rt.DEFAULT_CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in caps["bounding"] and "CAP_NET_RAW" in caps["bounding"]
    dests = [m["destination"] for m in s["mounts"]]
    assert dests == ["/proc", "/dev", "/dev/pts", "/sys", "/sys/fs/cgroup", "/dev/mqueue", "/dev/shm", "/etc/hosts"]
    mounts = {m["destination"]: m for m in s["mounts"]}
    assert "ro" in mounts["/sys"]["options"] and "ro" in mounts["/sys/fs/cgroup"]["options"]
    assert mounts["/dev"]["type"] == "tmpfs"
    assert "/proc/kcore" in s["linux"]["maskedPaths"] and "/proc/sys" in s["linux"]["readonlyPaths"]
    assert s["linux"]["cgroupsPath"] == "layerfs/x"
    assert spec(terminal=True)["process"]["terminal"] is True


def test_bad_hostname():
    with pytest.raises(InvalidOption):
        spec(hostname="x" * 65)


# -- runtimes, status, CLI parsing ---------------------------------------------------------------
def test_find_runtime_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(rt.shutil, "which", lambda *a, **k: None)
    with pytest.raises(LayerfsError) as e:
        rt.find_runtime("runc")
    assert str(e.value) == "no OCI runtime 'runc' is installed; apt-get install runc (or make setup)"
    with pytest.raises(rt.RuntimeNotFound, match="apt-get install crun"):
        rt.find_runtime("crun")
    with pytest.raises(InvalidOption, match="--runtime"):
        rt.find_runtime("docker")


def test_crun_on_a_hybrid_host_runs_without_cgroup2(monkeypatch):
    monkeypatch.setattr(rt, "hybrid_cgroup2_mounts", lambda: ["/sys/fs/cgroup/unified"])
    cmd = rt.runtime_command("crun", "/usr/bin/crun", "/st", "run", "x", log="/l")
    assert cmd[:5] == [cmd[0], "-m", "--propagation", "private", "sh"]
    assert "umount '/sys/fs/cgroup/unified'" in cmd[6]
    assert cmd[7:] == ["/usr/bin/crun", "--root", "/st", "--log=/l", "--log-format=json", "run", "x"]
    assert rt.runtime_command("runc", "/usr/sbin/runc", "/st", "run", "x") == ["/usr/sbin/runc", "--root", "/st", "run", "x"]
    monkeypatch.setattr(rt, "hybrid_cgroup2_mounts", lambda: [])
    assert rt.runtime_command("crun", "/usr/bin/crun", "/st", "run", "x")[0] == "/usr/bin/crun"


@pytest.mark.parametrize(
    "lines, status",
    [
        ([], None),
        (['{"level":"warning","msg":"x"}'], None),
        (['{"level":"error","msg":"runc run failed: unable to start container process: exec: \\"nope\\": executable file not found in $PATH"}'], 127),
        (['{"msg":"executable file `nope` not found in $PATH: No such file or directory","level":"error"}'], 127),
        (['{"level":"error","msg":"runc run failed: unable to start container process: exec: \\"/x\\": permission denied"}'], 126),
        (['{"msg":"open executable: Permission denied","level":"error"}'], 126),
        (['not json', '{"level":"error","msg":"runc run failed: cgroup trouble"}'], 125),
    ],
)
def test_start_error_status(tmp_path, lines, status):
    log = tmp_path / "log"
    log.write_text("\n".join(lines))
    assert rt._start_error_status(log) == status
    assert rt._start_error_status(tmp_path / "missing") is None


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerfs")
    add_run_command(p.add_subparsers(dest="command"))
    return p


def test_cli_arguments():
    a = run_parser().parse_args(["run", "--rm", "--name", "n", "-e", "A=1", "--env", "B=2", "--workdir", "/w",
                                 "--user", "1:2", "--runtime", "crun", "--network", "host", "img", "sh", "-c", "echo --rm"])
    assert (a.rm, a.name, a.env, a.workdir, a.user, a.runtime, a.network, a.tty) == (
        True, "n", ["A=1", "B=2"], "/w", "1:2", "crun", "host", None)
    assert (a.image, a.cmd) == ("img", ["sh", "-c", "echo --rm"])
    d = run_parser().parse_args(["run", "img"])
    assert (d.rm, d.name, d.env, d.runtime, d.network, d.cmd) == (False, None, [], "runc", "none", [])
    assert run_parser().parse_args(["run", "-t", "img"]).tty is True
    assert run_parser().parse_args(["run", "--no-tty", "img"]).tty is False
    with pytest.raises(SystemExit):
        run_parser().parse_args(["run", "--network", "bridge", "img"])
    with pytest.raises(SystemExit):
        run_parser().parse_args(["run"])


# -- real runs -----------------------------------------------------------------------------------
needs_runc = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("runc") or os.path.exists("/usr/sbin/runc")),
    reason="real runs need root and runc (apt-get install runc)",
)


def busybox_layer() -> bytes:
    from tarbuild import LayerTar

    t = LayerTar().dir("bin").file("bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755)
    for applet in APPLETS:
        t.symlink(f"bin/{applet}", "busybox")
    t.dir("etc").file("etc/passwd", PASSWD.encode()).file("etc/group", GROUP.encode())
    t.file("etc/hosts", b"127.0.0.1 localhost\n").file("etc/resolv.conf", b"")
    t.dir("tmp", mode=0o1777).dir("root", mode=0o700).dir("home").dir("home/app", uid=1000, gid=1000)
    t.dir("srv").file("srv/marker", b"srv\n")
    # Mount points, as real images have them (runc creates missing ones in the container layer).
    t.dir("proc", mode=0o555).dir("dev").dir("sys", mode=0o555)
    return t.bytes()


def add_image(store, name: str, layer: bytes, container_config: dict):
    from tarbuild import sha256_digest

    from layerfs.engine.images import ImageStore

    diff_id = sha256_digest(layer)
    chain = store.register(io.BytesIO(layer), expected_diff_id=diff_id).chain_id
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "layerfs tests"}],
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": diff_id, "size": len(layer)}],
    }).encode()
    images = ImageStore(store)
    images.add(name, manifest, "application/vnd.oci.image.manifest.v1+json", config, [chain])
    return images


@pytest.fixture
def box(store):
    """(store, images) with image "box" (busybox; Env FOO=image, Cmd sh -c 'echo default')."""
    images = add_image(store, "box", busybox_layer(),
                       {"Env": ["PATH=/bin", "FOO=image"], "Cmd": ["/bin/sh", "-c", "echo default"]})
    return store, images


def run_captured(store, images, args, tmp_path, **kw) -> tuple[int, str, str]:
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        status = rt.run(store, images, "box", args, stdin=subprocess.DEVNULL, stdout=o, stderr=e, **kw)
    return status, out.read_text(), err.read_text()


def assert_nothing_left(store, name):
    with pytest.raises(NotFound):
        store.container(name)
    assert store.containers() == []
    run_dir = store.root / "engine" / "run"
    assert not run_dir.exists() or os.listdir(run_dir) == []
    runc_state = store.root / "engine" / "runc"
    assert not runc_state.exists() or os.listdir(runc_state) == []
    assert mounts_under(store.root) == []


@needs_runc
def test_run_prints_and_returns_the_exit_status(box, tmp_path):
    store, images = box
    status, out, err = run_captured(store, images, ["/bin/sh", "-c", "echo hi; exit 3"], tmp_path, rm=True, name="t1")
    assert (status, out, err) == (3, "hi\n", "")
    assert_nothing_left(store, "t1")


@needs_runc
def test_run_uses_the_image_command_by_default(box, tmp_path):
    store, images = box
    status, out, _ = run_captured(store, images, [], tmp_path, rm=True)
    assert (status, out) == (0, "default\n")
    assert store.containers() == []


@needs_runc
def test_env_workdir_user_take_effect(box, tmp_path):
    store, images = box
    script = 'echo "$FOO $BAR $HOME $HOSTNAME"; pwd; id -u; id -g; id -G'
    status, out, _ = run_captured(store, images, ["sh", "-c", script], tmp_path, rm=True, name="envtest",
                                  env=["FOO=user", "BAR=x=y"], workdir="/srv", user="1000")
    assert status == 0
    assert out.splitlines() == ["user x=y /home/app envtest", "/srv", "1000", "1000", "1000 2000"]
    status, out, _ = run_captured(store, images, ["sh", "-c", script], tmp_path, rm=True, user="app:extra")
    assert out.splitlines()[1:] == ["/", "1000", "2000", "2000"]
    status, out, _ = run_captured(store, images, ["sh", "-c", "id -u; id -g; echo $FOO"], tmp_path, rm=True, user="4242:4343")
    assert out.splitlines() == ["4242", "4343", "image"]


@needs_runc
def test_stdin_is_passed_through(box, tmp_path):
    store, images = box
    src = tmp_path / "in"
    src.write_bytes(b"line 1\nline 2\n")
    with open(src, "rb") as i, open(tmp_path / "o", "wb") as o:
        assert rt.run(store, images, "box", ["wc", "-l"], rm=True, stdin=i, stdout=o) == 0
    assert (tmp_path / "o").read_text().strip() == "2"


@needs_runc
def test_writes_persist_without_rm(box, tmp_path):
    store, images = box
    status, _, _ = run_captured(store, images, ["sh", "-c", "echo data > /srv/new; mkdir /made"], tmp_path, name="keep")
    assert status == 0
    ctr = store.container("keep")
    assert ctr.mounts == 0 and mounts_under(store.root) == []
    assert not (store.root / "engine" / "run" / "keep").exists()
    changes = store.changes("keep")
    assert Change("/srv/new", "A") in changes and Change("/made", "A") in changes
    assert {c.path for c in changes} == {"/srv", "/srv/new", "/made"}  # nothing else: no mount points left behind
    root = store.mount("keep")
    try:
        assert (root / "srv/new").read_text() == "data\n"
    finally:
        store.unmount("keep")
    # the name is taken while the container exists
    with pytest.raises(LayerfsError, match="already exists"):
        rt.run(store, images, "box", ["true"], name="keep")
    store.remove_container("keep")


@needs_runc
def test_missing_command_is_127_and_container_kept_or_removed(box, tmp_path):
    store, images = box
    status, _, err = run_captured(store, images, ["/bin/nope"], tmp_path, rm=True, name="nocmd")
    assert status == 127 and "nope" in err
    assert_nothing_left(store, "nocmd")


@needs_runc
def test_network_none_has_loopback_only_and_host_shares(box, tmp_path):
    store, images = box
    status, out, _ = run_captured(store, images, ["sh", "-c", "ls /sys/class/net; cat /sys/class/net/lo/flags"], tmp_path, rm=True)
    assert status == 0 and out.split() == ["lo", "0x9"]  # IFF_UP | IFF_LOOPBACK
    status, out, _ = run_captured(store, images, ["sh", "-c", "ls /sys/class/net; cat /etc/resolv.conf"], tmp_path, rm=True,
                                  network="host")
    assert status == 0
    assert sorted(out.split()[: len(os.listdir("/sys/class/net"))]) == sorted(os.listdir("/sys/class/net"))
    assert out.split("\n", len(os.listdir("/sys/class/net")))[-1] == Path("/etc/resolv.conf").read_text()
    assert store.containers() == []


@needs_runc
def test_bad_input_creates_nothing(box, tmp_path, monkeypatch):
    store, images = box
    for kw in ({"env": ["NOPE"]}, {"user": "a:b:c"}, {"workdir": "rel"}, {"network": "bridge"}, {"runtime": "docker"},
               {"tty": True, "stdin": subprocess.DEVNULL}):
        with pytest.raises(InvalidOption):
            rt.run(store, images, "box", ["true"], name="bad", **kw)
    with pytest.raises(InvalidOption, match="passwd"):  # known only once mounted: the container goes again
        rt.run(store, images, "box", ["true"], name="bad", user="ghost")
    with pytest.raises(NotFound, match="image"):
        rt.run(store, images, "nosuchimage", ["true"], name="bad")
    monkeypatch.setattr(rt.shutil, "which", lambda *a, **k: None)
    with pytest.raises(rt.RuntimeNotFound, match="no OCI runtime 'runc' is installed"):
        rt.run(store, images, "box", ["true"], name="bad")
    assert_nothing_left(store, "bad")


@needs_runc
def test_generated_names_and_hostname(box, tmp_path):
    store, images = box
    status, out, _ = run_captured(store, images, ["sh", "-c", "cat /proc/sys/kernel/hostname"], tmp_path)
    (ctr,) = store.containers()
    assert status == 0 and ctr.name.startswith("layerfs-") and len(ctr.name) == len("layerfs-") + 8
    assert out.strip() == ctr.name
    store.remove_container(ctr.name)


CLI = textwrap.dedent("""
    import sys
    from layerfs import cli
    from layerfs.engine.cli_run import add_run_command
    build = cli.build_parser
    def build_parser():
        p = build()
        sub = p._subparsers._group_actions[0]
        if "run" not in sub.choices:
            add_run_command(sub)
        return p
    cli.build_parser = build_parser
    sys.exit(cli.main(sys.argv[1:]))
""")


def layerfs_cli(root, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLI, "--root", str(root), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@needs_runc
def test_cli_run_rm_prints_hi_and_exits_3(box):
    store, _ = box
    proc = layerfs_cli(store.root, "run", "--rm", "box", "/bin/sh", "-c", "echo hi; exit 3")
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (3, "hi\n", "")
    assert_nothing_left(store, "any")


@needs_runc
def test_cli_usage_errors_are_one_line(box):
    store, _ = box
    proc = layerfs_cli(store.root, "run", "--rm", "--env", "NOPE_NOT_SET_ANYWHERE", "box", "true")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.startswith("layerfs: --env") and err.count("\n") == 1
    proc = layerfs_cli(store.root, "run", "--rm", "box", "/bin/missing")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 127


@needs_runc
def test_interrupted_run_kills_the_container_and_cleans_up(box):
    store, _ = box
    # sh is PID 1 and ignores SIGTERM (no handler), like under docker; a second one forces.
    proc = layerfs_cli(store.root, "run", "--rm", "--name", "sleepy", "box", "sh", "-c", "echo up; sleep 60")
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL
    assert_nothing_left(store, "sleepy")


@needs_runc
def test_sigterm_reaches_a_container_with_a_handler(box):
    store, _ = box
    proc = layerfs_cli(store.root, "run", "--rm", "box", "sh", "-c", "trap 'echo term; exit 7' TERM; echo up; while :; do sleep 0.1; done")
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (7, "term\n")
    assert store.containers() == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("crun"), reason="needs root and crun (apt-get install crun)")
def test_crun(box, tmp_path):
    store, images = box
    status, out, err = run_captured(store, images, ["/bin/sh", "-c", "echo hi; id -u; exit 3"], tmp_path, rm=True,
                                    runtime="crun", user="1000", name="c1")
    assert (status, out, err) == (3, "hi\n1000\n", "")
    assert not (store.root / "engine" / "crun" / "c1").exists()
    assert_nothing_left(store, "c1")
