#!/bin/busybox sh
# forkd guest init (PID 1 of the initramfs): load the virtio drivers, build the
# root as an overlay of the read-only template disk (vda) and the VM's private
# writable disk (vdb), put forkd's guest code beside it, then become the agent.
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
fail() { echo "forkd-init: $*" >/dev/console; sleep 1; poweroff -f; }

mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m" || fail "insmod $m failed"
done
n=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ] || [ ! -d /sys/class/virtio-ports ]; do
    n=$((n + 1)); [ $n -gt 1000 ] && fail "virtio disks or ports did not appear"
    sleep 0.01
done

mount -t ext4 -o ro,noload /dev/vda /lower || fail "cannot mount the template disk"
mount -t ext4 -o noatime /dev/vdb /upper || fail "cannot mount the writable disk"
mkdir -p /upper/root /upper/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/root,workdir=/upper/work /newroot \
    || fail "cannot mount the overlay root"

R=/newroot
mount -t tmpfs -o mode=0755,size=16m forkd-lib $R/opt/forkd/lib
cp -a /forkd/lib/. $R/opt/forkd/lib/
cp /forkd/warmup.py $R/opt/forkd/lib/warmup.py
mount -o remount,ro $R/opt/forkd/lib

mount --move /dev $R/dev
mkdir -p $R/dev/virtio-ports $R/dev/pts $R/dev/shm
for p in /sys/class/virtio-ports/*; do
    ln -sf "../$(basename "$p")" "$R/dev/virtio-ports/$(cat "$p/name")"
done
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts $R/dev/pts
ln -sf pts/ptmx $R/dev/ptmx
mount -t tmpfs -o mode=1777 shm $R/dev/shm
# /etc/hostname shows the live kernel hostname and is read-only, so setting
# the hostname after a fork is one syscall, not a file write on the disk.
# (Before /proc moves: busybox reads /proc/mounts to remount.)
rm -f $R/etc/hostname; touch $R/etc/hostname
mount --bind /proc/sys/kernel/hostname $R/etc/hostname
mount -o remount,ro,bind $R/etc/hostname || fail "cannot make /etc/hostname read-only"
mount --move /proc $R/proc
mount --move /sys $R/sys
mount -t tmpfs -o mode=0755 run $R/run
ip link set lo up
hostname forkd
S=$R/proc/sys
echo 1 > $S/kernel/printk
# Fewer periodic wake-ups per idle VM (each costs host CPU under TCG).
echo 30 > $S/vm/stat_interval
echo 0 > $S/vm/compaction_proactiveness
# No periodic writeback: the disk is the sandbox's scratch layer, written when
# memory asks for it or a program syncs (each wake-up costs host CPU per VM).
echo 0 > $S/vm/dirty_writeback_centisecs

# Nothing dirty left for the children to write back, each on its own.
sync
export HOME=/root LANG=C.UTF-8 PYTHONPATH=/opt/forkd/lib PYTHONDONTWRITEBYTECODE=1
@ENV@
exec switch_root $R /usr/bin/python3 -m forkd_vm_guest \
    --port /dev/virtio-ports/@AGENT_PORT@ \
    --warmup-file /opt/forkd/lib/warmup.py --sandbox-id forkd-parent --log-level WARNING
