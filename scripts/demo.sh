#!/usr/bin/env bash
# layerfs demo: a three-layer busybox image on an overlay2 store, driven only
# through the `layerfs` CLI. Run it with `make demo` (which runs setup first).
#
#   scripts/demo.sh           run the demo (a previous demo store is removed first)
#   scripts/demo.sh --clean   only remove the demo store (unmounting what is mounted)
#
# The store lives in $LAYERFS_DEMO_DIR/store (default /var/lib/layerfs-demo/store),
# a directory this script owns: each run starts from an empty store, and the
# store is left in place afterwards so you can explore it with the CLI.
# The sample image tars are written to build/sample-image/ in the repo.
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd -P)
DEMO_DIR=${LAYERFS_DEMO_DIR:-/var/lib/layerfs-demo}
ROOT="$DEMO_DIR/store"
MARKER="$DEMO_DIR/.layerfs-demo"
IMG="$REPO/build/sample-image"
EXPORT="$REPO/build/demo-diff.tar"
NAME=demo
PY="$REPO/.venv/bin/python"
# LAYERFS_CLI: another `layerfs` executable to demo (default: the repo's venv).
LAYERFS=("${LAYERFS_CLI:-$REPO/.venv/bin/layerfs}" --root "$ROOT")

if [ -t 1 ]; then B=$'\e[1m' D=$'\e[2m' R=$'\e[0m'; else B='' D='' R=''; fi
STEP="starting"
step() { STEP="$*"; printf '\n%s==> %s%s\n' "$B" "$*" "$R"; }
say() { printf '    %s\n' "$*"; }
show() { printf '%s$ %s%s\n' "$D" "$*" "$R"; }
die() {
    trap - ERR
    printf 'demo: error: %s\n' "$*" >&2
    hint
    exit 1
}
hint() {
    if [ -e "$ROOT" ]; then
        printf 'demo: the store is left at %s for inspection; `make demo` or `scripts/demo.sh --clean` starts over\n' "$ROOT" >&2
    fi
}
# Run the CLI, showing the command line first (--root is said once, in the preflight).
lfs() { show "layerfs $*"; "${LAYERFS[@]}" "$@"; }
# Same, but capture stdout (the command's one-line answer) into the variable $1.
lfs_capture() {
    local __var=$1; shift
    show "layerfs $*"
    local __out
    __out=$("${LAYERFS[@]}" "$@")
    printf '%s\n' "$__out"
    printf -v "$__var" '%s' "$__out"
}
on_error() {
    local rc=$?
    trap - ERR
    # A failing command inside $(...) trips the trap in the subshell first: let the
    # parent report it once.
    [ "$BASH_SUBSHELL" -eq 0 ] || exit "$rc"
    printf '\ndemo: FAILED at step "%s" (exit %s)\n' "$STEP" "$rc" >&2
    hint
    exit "$rc"
}
trap on_error ERR

[ "$(id -u)" -eq 0 ] || die "the demo mounts overlayfs and uses chroot: run it as root"
case "$DEMO_DIR" in /?*) ;; *) die "LAYERFS_DEMO_DIR must be an absolute path, not '$DEMO_DIR'" ;; esac

# Every mount point that belongs to the demo store: mounted under $ROOT, or an
# overlay whose layer directories live under $ROOT. Deepest first.
store_mounts() {
    awk -v root="$ROOT/" '
        function unesc(s) { gsub(/\\040/, " ", s); gsub(/\\011/, "\t", s); gsub(/\\012/, "\n", s); gsub(/\\134/, "\\", s); return s }
        {
            mp = unesc($5)
            for (i = 7; $i != "-"; i++) ;
            opts = $(i + 3)
            if (index(mp "/", root) == 1 || index(opts, root) > 0) print mp
        }' /proc/self/mountinfo | sort -r
}

clean_store() {
    [ -e "$DEMO_DIR" ] || return 0
    if [ ! -e "$MARKER" ]; then
        die "$DEMO_DIR exists but was not made by this demo (no $MARKER); choose another LAYERFS_DEMO_DIR"
    fi
    local mp
    while IFS= read -r mp; do
        [ -n "$mp" ] || continue
        say "unmounting leftover $mp"
        umount "$mp" 2>/dev/null || umount -l "$mp"
    done < <(store_mounts)
    if [ -e "$ROOT" ]; then
        say "removing the previous demo store $ROOT"
        rm -rf --one-file-system "$ROOT"
    fi
}

if [ "${1:-}" = "--clean" ]; then
    clean_store
    rm -rf "$DEMO_DIR"
    echo "demo store removed"
    exit 0
fi
[ $# -eq 0 ] || die "usage: scripts/demo.sh [--clean]"

# ------------------------------------------------------------------ preflight
step "Checking the environment"
[ -x "$PY" ] && [ -x "${LAYERFS[0]}" ] || die ".venv is missing: run 'make setup' (or 'make demo')"
[ -n "${LAYERFS_CLI:-}" ] || "$PY" -c 'import layerfs.cli' 2>/dev/null ||
    die "the layerfs CLI (layerfs/cli.py) cannot be imported: $("$PY" -c 'import layerfs.cli' 2>&1 | tail -n1 || true)"
say "layerfs CLI: ${LAYERFS[0]}"
say "demo store:  $ROOT  (every 'layerfs' below runs with --root $ROOT)"
clean_store
mkdir -p "$DEMO_DIR"
: >"$MARKER"

# ---------------------------------------------------------------------- image
step "Building the sample image from busybox-static (3 layers, the 3rd deletes a file)"
show "python scripts/build_sample_image.py build/sample-image"
"$PY" scripts/build_sample_image.py "$IMG" | while read -r f d c; do
    say "$f  diff_id ${d:0:19}…  chain_id ${c:0:19}…"
done
mapfile -t FILES < <("$PY" -c 'import json,sys; [print(l["file"]) for l in json.load(open(sys.argv[1]))["layers"]]' "$IMG/manifest.json")
mapfile -t CHAINS < <("$PY" -c 'import json,sys; [print(l["chain_id"]) for l in json.load(open(sys.argv[1]))["layers"]]' "$IMG/manifest.json")

# ---------------------------------------------------------------------- store
step "Opening the store: driver and probe results"
lfs info

step "Registering the layers, each on top of the previous one"
PARENT=""
for i in "${!FILES[@]}"; do
    f="$IMG/${FILES[$i]}"
    if [ -z "$PARENT" ]; then
        lfs_capture CHAIN layer add "$f"
    else
        lfs_capture CHAIN layer add "$f" --parent "$PARENT"
    fi
    [[ $CHAIN =~ ^sha256:[0-9a-f]{64}$ ]] ||
        die "'layerfs layer add' should print a chain id (sha256:<64 hex>), it printed: $CHAIN"
    [ "$CHAIN" = "${CHAINS[$i]}" ] ||
        die "chain id of ${FILES[$i]} is $CHAIN, the OCI image spec gives ${CHAINS[$i]}"
    PARENT=$CHAIN
done
TOP=$PARENT
say "chain ids match the ones computed by the OCI image spec"

lfs layer ls

# ------------------------------------------------------------------ container
step "Creating a writable container '$NAME' on the top layer"
lfs create "$TOP" "$NAME"
lfs ps

step "Mounting it (the mount stays after the command exits)"
lfs_capture MNT mount "$NAME"
[ -d "$MNT" ] || die "'layerfs mount' should print the mount path, it printed: $MNT"
mountpoint -q "$MNT" || die "'layerfs mount' printed $MNT but nothing is mounted there"
show "findmnt $MNT"
findmnt -n -o FSTYPE,TARGET "$MNT" | sed 's/^/    /'
show "ls $MNT/etc"
ls "$MNT/etc" | sed 's/^/    /'
[ ! -e "$MNT/etc/obsolete.conf" ] || die "/etc/obsolete.conf is visible, but layer 3 whited it out"
[ -f "$MNT/opt/app/VERSION" ] || die "/opt/app/VERSION from layer 3 is missing"
say "/etc/obsolete.conf (added by layer 2, whited out by layer 3) is gone, as it should be"

step "Changing the container: add a file, change one, delete one"
show "echo ... > $MNT/root/hello.txt"
echo "hello from the layerfs demo" >"$MNT/root/hello.txt"
show "echo ... >> $MNT/etc/motd"
echo "Edited by scripts/demo.sh." >>"$MNT/etc/motd"
show "rm $MNT/opt/app/config.txt"
rm "$MNT/opt/app/config.txt"

step "Running busybox inside the container (chroot)"
show "chroot $MNT /bin/sh -c 'cat /etc/motd; ls -l /opt/app; cat /root/hello.txt; id'"
chroot "$MNT" /bin/sh -c 'cat /etc/motd; ls -l /opt/app; cat /root/hello.txt; id' | sed 's/^/    /'

step "What changed, like 'docker diff'"
lfs_capture DIFF diff "$NAME"
grep -qx 'A /root/hello.txt' <<<"$DIFF" || die "'layerfs diff' does not list 'A /root/hello.txt'"
grep -qx 'C /etc/motd' <<<"$DIFF" || die "'layerfs diff' does not list 'C /etc/motd'"
grep -qx 'D /opt/app/config.txt' <<<"$DIFF" || die "'layerfs diff' does not list 'D /opt/app/config.txt'"

step "Exporting the changes as an OCI layer tar"
mkdir -p "$(dirname "$EXPORT")"
lfs export-diff "$NAME" -o "$EXPORT"
show "tar -tvf build/demo-diff.tar"
tar -tvf "$EXPORT" | sed 's/^/    /'
# (grep on a captured list: `tar | grep -q` would trip pipefail with SIGPIPE)
ENTRIES=$(tar -tf "$EXPORT")
grep -qx 'opt/app/.wh.config.txt' <<<"$ENTRIES" ||
    die "the exported diff has no whiteout opt/app/.wh.config.txt for the deleted file"

step "Committing the container into a new read-only layer"
lfs_capture NEW commit "$NAME"
[[ $NEW =~ ^sha256:[0-9a-f]{64}$ ]] ||
    die "'layerfs commit' should print a chain id (sha256:<64 hex>), it printed: $NEW"

step "Unmounting and removing the container"
lfs umount "$NAME"
if mountpoint -q "$MNT"; then die "$MNT is still mounted after 'layerfs umount $NAME'"; fi
lfs rm "$NAME"
lfs ps

step "Mounting the committed layer read-only and looking inside"
lfs_capture VIEW mount "$NEW"
[ -d "$VIEW" ] || die "'layerfs mount $NEW' should print the mount path, it printed: $VIEW"
show "cat $VIEW/root/hello.txt"
sed 's/^/    /' "$VIEW/root/hello.txt"
[ ! -e "$VIEW/opt/app/config.txt" ] || die "/opt/app/config.txt came back in the committed layer"
show "touch $VIEW/should-fail"
if touch "$VIEW/should-fail" 2>/dev/null; then
    die "a chain id mount should be read-only, but writing to $VIEW worked"
else
    say "refused, as it should be: the view of a layer is read-only"
fi
lfs umount "$NEW"

step "The store now"
lfs layer ls
lfs check

step "Done"
say "4 layers (3 from the image, 1 committed) are in $ROOT; explore them with"
say "  .venv/bin/layerfs --root $ROOT layer ls"
say "Run 'make demo' again to start over, or 'scripts/demo.sh --clean' to remove the store."
