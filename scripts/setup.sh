#!/usr/bin/env bash
# Fresh-machine setup for layerfs (Debian/Ubuntu, as root).
#
# Idempotent and quick when already done:
#   1. apt packages: checked with dpkg-query; apt-get runs only when one is missing.
#   2. .venv: created with `python3 -m venv` when absent or unusable.
#   3. `pip install -e '.[test]'`: only when pyproject.toml (or the Python, or the
#      repo's location) changed since the last successful install, tracked by a
#      stamp file inside .venv.
#
# Environment: PYTHON (default python3) picks the interpreter for a new venv.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd -P)
VENV="$REPO/.venv"
STAMP="$VENV/.layerfs-install-stamp"
PYTHON=${PYTHON:-python3}

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- apt packages
# busybox-static: the sample image; xfsprogs/e2fsprogs: loop-image backing
# filesystems (overlay2.size quotas on xfs); tar; kmod: modprobe; util-linux:
# mount/losetup/findmnt; fuse3: the FUSE (aufs) driver.
# The VM test step (tests/vm/run.py): qemu-system-x86 (TCG), busybox-static for
# its initramfs (cpio to inspect one), kmod (depmod/modprobe on the Debian kernel),
# lvm2 + thin-provisioning-tools for the device-mapper tests run in the guest.
# runc (default) and crun: the OCI runtimes of `layerfs run`.
APT_PACKAGES=(busybox-static xfsprogs e2fsprogs tar kmod util-linux fuse3
              qemu-system-x86 cpio lvm2 thin-provisioning-tools runc crun)

# The registry tests (tests/engine/test_registry.py): docker-registry (the CNCF
# distribution server), apache2-utils (htpasswd -B for its basic auth), openssl
# (the test token server's signing key).
APT_PACKAGES+=(docker-registry apache2-utils openssl)
APT_PACKAGES+=(strace skopeo umoci)  # kill-point tests; images written by clients we did not write
APT_PACKAGES+=(libfuse3-dev pkg-config)  # pip builds pyfuse3 (the aufs driver) from source against libfuse3

is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

venv_ok() {
    [ -x "$VENV/bin/python" ] &&
        "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done

# Python with venv + ensurepip, only needed when the venv has to be (re)made.
if ! venv_ok; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        missing+=(python3 python3-venv)
    elif ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        # Debian splits ensurepip out of python3 into python3-venv.
        is_installed python3-venv || missing+=(python3-venv)
    fi
fi

if [ ${#missing[@]} -gt 0 ]; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root to install: ${missing[*]}"
        SUDO=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found; install these by hand: ${missing[*]}"
    say "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    say "apt: done"
else
    say "apt: all packages present (${APT_PACKAGES[*]})"
fi

# ------------------------------------------------------------------------ venv
# What the installed environment depends on; a change means reinstall.
want_stamp() {
    printf 'pyproject %s\nrepo %s\npython %s\n' \
        "$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)" \
        "$REPO" \
        "$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')"
}

recreate=0
if ! venv_ok; then
    recreate=1
elif [ -f "$STAMP" ] && ! grep -qxF "repo $REPO" "$STAMP"; then
    # Console scripts and the editable finder hold absolute paths: a venv made
    # for another checkout location is no good here.
    say "venv: made for another checkout, recreating"
    recreate=1
fi
if [ $recreate -eq 1 ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "layerfs needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1)"
    say "venv: creating .venv with $("$PYTHON" -V 2>&1)"
    rm -f "$STAMP"
    "$PYTHON" -m venv --clear "$VENV"
else
    say "venv: .venv present ($("$VENV/bin/python" -V 2>&1))"
fi

want=$(want_stamp)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/layerfs" ]; then
    say "pip: up to date (pyproject.toml unchanged since last install)"
else
    say "pip: installing layerfs and its test deps (pip install -e '.[test]')"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q -e "$REPO[test]"
    printf '%s\n' "$want" >"$STAMP"
    say "pip: done"
fi

say "ready: .venv/bin/layerfs, .venv/bin/python -m pytest"
