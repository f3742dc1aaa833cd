"""The `layerfs` command line, run as a user would: a real process per command."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from layerfs import _mountapi

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for overlay mounts")


def _tar(path: Path, files: dict[str, bytes], whiteouts=()) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in sorted(files.items()):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
        for name in whiteouts:
            tf.addfile(tarfile.TarInfo(f".wh.{name}"))
    return path


@pytest.fixture
def cli(tmp_path):
    root = tmp_path / "root"

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "layerfs", "--root", str(root), *args], capture_output=True, text=True, timeout=120
        )
        if ok:
            assert proc.returncode == 0, f"layerfs {' '.join(args)} failed: {proc.stderr}"
        return proc

    yield run
    for point in _mountapi.mounts_under(str(root)):
        _mountapi.umount(point, _mountapi.MNT_DETACH)


def test_full_session(cli, tmp_path):
    base = _tar(tmp_path / "base.tar", {"etc/motd": b"hi\n", "etc/old": b"o"})
    top = _tar(tmp_path / "top.tar", {"app": b"v1"}, whiteouts=("etc/old"[4:],))
    base_id = cli("layer", "add", str(base)).stdout.strip()
    top_id = cli("layer", "add", str(top), "--parent", base_id[7:19]).stdout.strip()  # a short id works
    assert top_id.startswith("sha256:") and len(top_id) == 71
    listing = json.loads(cli("--json", "layer", "ls").stdout)
    assert {l["chain_id"] for l in listing} == {base_id, top_id}

    assert cli("create", top_id, "web").stdout.strip() == "web"
    path = Path(cli("mount", "web").stdout.strip())
    assert _mountapi.is_mountpoint(str(path))
    assert (path / "etc/motd").read_text() == "hi\n"
    (path / "etc/motd").write_text("changed\n")
    (path / "new").write_text("n")
    os.unlink(path / "app")
    # The mount outlives the command that made it; `mount` with no argument lists it.
    assert str(path) in cli("mount").stdout
    assert cli("diff", "web").stdout.splitlines() == ["D /app", "C /etc", "C /etc/motd", "A /new"]
    assert json.loads(cli("ps", "--json").stdout)[0]["mounts"] == 1

    out = tmp_path / "diff.tar"
    diff_id = cli("export-diff", "web", "-o", str(out)).stdout.strip()
    with tarfile.open(out) as tf:
        assert sorted(tf.getnames()) == [".wh.app", "etc", "etc/motd", "new"]
    commit_id = cli("commit", "web").stdout.strip()
    info = json.loads(cli("--json", "layer", "ls").stdout)
    committed = next(l for l in info if l["chain_id"] == commit_id)
    assert committed["diff_id"] == diff_id and committed["parent"] == top_id

    cli("umount", "web")
    assert not _mountapi.is_mountpoint(str(path))
    assert cli("rm", "web").stdout.strip() == "web"
    assert cli("check").stdout.strip() == "store is consistent"
    info = json.loads(cli("info", "--json").stdout)
    assert info["driver"] == "overlay2" and info["containers"] == 0 and info["layers"] == 3


@pytest.mark.parametrize(
    "args, words",
    [
        (("mount", "nosuch"), ["nosuch"]),
        (("rm", "nosuch"), ["nosuch", "does not exist"]),
        (("layer", "add", "/nonexistent.tar"), ["/nonexistent.tar", "does not exist"]),
        (("--storage-opt", "bogus=1", "info"), ["bogus"]),
        (("--storage-opt", "novalue", "info"), ["novalue", "KEY=VALUE"]),
        (("--driver", "zfs", "info"), ["zfs", "overlay2"]),
        (("create", "scratch", "bad/name"), ["bad/name"]),
        (("layer", "rm", "sha256:" + "0" * 64), ["does not exist"]),
    ],
)
def test_user_errors_are_one_line(cli, args, words):
    proc = cli(*args, ok=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: ")
    for word in words:
        assert word in lines[0]


def test_refused_layer_and_busy_container(cli, tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        ti = tarfile.TarInfo("../escape")
        tf.addfile(ti)
    proc = cli("layer", "add", str(evil), ok=False)
    assert proc.returncode == 1 and "../escape" in proc.stderr
    assert json.loads(cli("--json", "layer", "ls").stdout) == []

    cli("create", "scratch", "busy")
    cli("mount", "busy")
    proc = cli("rm", "busy", ok=False)
    assert proc.returncode == 1 and "umount" in proc.stderr
    cli("rm", "-f", "busy")
    assert json.loads(cli("--json", "ps").stdout) == []
