#!/bin/busybox sh
# The guest's PID 1 (tests/kernel/image.py puts it in the initramfs; tests/kernel/guest.py boots it).
# Loads the modules, mounts the host's root (read-only, 9p tag "hostroot") at /host under an overlay that
# keeps the guest's writes in its memory (/tmp included, so a checkout under /tmp is seen there too), with
# fresh /run, /proc, /sys, /dev and bpffs, mounts the
# job directory (read-write, 9p tag "job") at /host/tmp/authd-guest,
# runs the job's run.sh chrooted into /host, and powers off. Each step is echoed to the console, so a
# failed boot says where it stopped.
/bin/busybox mkdir -p /usr/bin /sbin /usr/sbin
/bin/busybox --install -s
mount -t devtmpfs dev /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys

step() {
	echo "authd-guest: $*"
}
fail() {
	echo "authd-guest: FAILED: $*"
	poweroff -f
}

step "loading modules"
while read -r module; do
	insmod "/modules/$module" || fail "insmod $module"
done </modules/order

step "mounting the host root"
p9="trans=virtio,version=9p2000.L,msize=262144"
mkdir -p /lower /rw
mount -t 9p -o "$p9,ro,cache=loose" hostroot /lower || fail "mount hostroot"
mount -t tmpfs rw /rw && mkdir /rw/upper /rw/work || fail "mount the overlay's tmpfs"
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work root /host || fail "mount the overlay"
mount -t tmpfs -o mode=755 run /host/run || fail "mount /run"
mount -t proc proc /host/proc || fail "mount /proc"
mount -t sysfs sys /host/sys || fail "mount /sys"
mount -t bpf bpf /host/sys/fs/bpf || fail "mount bpffs"
mount -t devtmpfs dev /host/dev || fail "mount /dev"
mkdir -p /host/dev/shm /host/tmp/authd-guest
mount -t tmpfs -o mode=1777 shm /host/dev/shm || fail "mount /dev/shm"
mount -t 9p -o "$p9" job /host/tmp/authd-guest || fail "mount job"
ip link set lo up

step "running the job"
chroot /host /bin/sh /tmp/authd-guest/run.sh
step "job exited $?"
sync
poweroff -f
