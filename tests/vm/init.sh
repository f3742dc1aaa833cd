#!/bin/busybox sh
# /init of the layerfs test VM's initramfs (busybox-static; built by tests/vm/run.py).
#
# 1. proc/sys/devtmpfs, kernel messages off the console, the modules listed in
#    /modules/load.list (virtio, 9p, overlay, loop, xfs, ext4, dm, ...).
# 2. The host's / (9p tag "hostroot", read-only) under an overlay with a tmpfs
#    upper at /newroot, so the guest can write without touching the host.
# 3. Fresh proc/sys/dev/run in it, and under /run/layerfs-vm/:
#      share/  9p tag "vmshare", read-write: job.sh from the host, rc, junit.xml
#      tmp/    tmpfs scratch (TMPDIR; overlay upper dirs can live here)
#      disk/   ext4 on /dev/vda (disk-backed scratch: O_DIRECT works there)
#    The unpacked Debian kernel's modules are bound over /lib/modules/$KVER.
# 4. chroot /newroot /bin/sh /run/layerfs-vm/share/job.sh; its exit status
#    goes to share/rc; poweroff.
#
# Settings come from /etc/layerfs-vm.conf (KVER, MODDIR: written at build
# time) and from the kernel command line (LAYERFS_SCRATCH=<tmpfs size>), which
# the kernel hands to init as environment variables.

/bin/busybox mkdir -p /proc /sys /dev /bin /sbin /usr/bin /usr/sbin /tmp
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 >/proc/sys/kernel/printk        # kernel messages stay in dmesg
stty -onlcr 2>/dev/null                # no CRLF on the serial console

say() { echo "layerfs-vm: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
die() {
    say "error: $*"
    dmesg | tail -n 25
    [ -d "$V/share" ] && echo 125 >"$V/share/rc" 2>/dev/null
    sync
    poweroff -f
    exit 1
}

say "init started at $(uptime_s)s (kernel $(uname -r))"
. /etc/layerfs-vm.conf || die "no /etc/layerfs-vm.conf in the initramfs"

# --------------------------------------------------------------- modules
while read -r ko args; do
    [ -n "$ko" ] || continue
    # shellcheck disable=SC2086  # module parameters are words
    err=$(insmod "/modules/$ko" $args 2>&1) || say "warning: insmod $ko $args: $err"
done </modules/load.list

# ------------------------------------------------------------ root overlay
mkdir -p /lower /upper /newroot
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=${LAYERFS_9P_CACHE:-loose} hostroot /lower ||
    die "cannot mount the host's / over 9p (tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /upper || die "cannot mount the overlay's tmpfs"
mkdir -p /upper/upper /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/upper,workdir=/upper/work overlay /newroot ||
    die "cannot mount the overlay root"

# For the kernel's own module requests (request_module runs /sbin/modprobe in
# this initramfs, not in the chroot): busybox modprobe reads modules.dep here.
mkdir -p "/lib/modules/$KVER"
mount -o bind "/lower$MODDIR" "/lib/modules/$KVER" || say "warning: no /lib/modules/$KVER in the initramfs"

R=/newroot
V=$R/run/layerfs-vm
mount -t proc proc $R/proc || die "cannot mount /proc in the guest root"
mount -t sysfs sysfs $R/sys || die "cannot mount /sys in the guest root"
mount -t devtmpfs devtmpfs $R/dev || die "cannot mount /dev in the guest root"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,gid=5,mode=0620 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755,size=64m tmpfs $R/run || die "cannot mount a fresh /run"
# runc and crun (the engine's tests on devicemapper) put every container in a cgroup
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || say "warning: no cgroup2 on /sys/fs/cgroup: runc cannot run containers"
mkdir -p $V/share $V/tmp $V/disk
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vmshare $V/share ||
    die "cannot mount the results share over 9p (tag vmshare)"
mount -t tmpfs -o "mode=1777,size=${LAYERFS_SCRATCH:-768m}" tmpfs $V/tmp || die "cannot mount the scratch tmpfs"
if [ -b /dev/vda ]; then
    mount -t ext4 /dev/vda $V/disk || say "warning: cannot mount /dev/vda (disk scratch) on /run/layerfs-vm/disk"
    chmod 1777 $V/disk 2>/dev/null
fi
chroot $R /bin/mkdir -p "/lib/modules/$KVER" &&
    chroot $R /bin/mount --bind "$MODDIR" "/lib/modules/$KVER" ||
    die "cannot bind the kernel modules over /lib/modules/$KVER in the guest root"

hostname layerfs-vm
ip link set lo up 2>/dev/null

[ -f $V/share/job.sh ] || die "no job.sh in the results share"
say "ready at $(uptime_s)s; running the job"
chroot $R /bin/sh /run/layerfs-vm/share/job.sh </dev/console >/dev/console 2>&1
rc=$?
echo "$rc" >$V/share/rc
sync
umount $V/share 2>/dev/null
say "job exited with status $rc at $(uptime_s)s; powering off"
poweroff -f
