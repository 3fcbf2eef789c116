#!/bin/busybox sh
# sandvm guest init (PID 1): mount the basics, load the virtio modules, start the agent.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mount -t cgroup2 -o favordynmods cgroup2 /sys/fs/cgroup 2>/dev/null || mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null; [ -e /sys/fs/cgroup/cgroup.controllers ] && echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
ln -sf /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin; ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
hostname sandvm
ip link set lo up 2>/dev/null
# virtio_mmio device parameters come on the kernel command line (QEMU adds them)
mmio=""
for w in $(cat /proc/cmdline); do
  case "$w" in virtio_mmio.device=*) mmio="$mmio device=${w#virtio_mmio.device=}";; esac
done
for m in $(cat /lib/sandvm/modules.order); do
  case "$m" in */virtio_mmio.ko) insmod "$m" $mmio ;; *) insmod "$m" ;; esac
done
case " $(cat /proc/cmdline) " in
  *" sandvm.probe=1 "*) echo "SANDVM-PROBE-OK $(uname -r)" > /dev/ttyS0; poweroff -f ;;
esac
cd /
# the agent is init's child; if it dies (a workload may kill it) it is started again
# and says HELLO anew, which tells the host that earlier operations are lost; it is
# exempt from the OOM killer from its first instruction (it gives its commands 0)
while true; do
  (echo -1000 > /proc/self/oom_score_adj
   PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/lib/sandvm exec /usr/bin/python3 -S -u /lib/sandvm/agent.py)
  echo "sandvm-agent exited with status $?; restarting" > /dev/kmsg
  sleep 0.2
done
