#!/bin/sh
# Boot the rbuild OS disk (examples/bootable/mkdisk.sh) with the flavor's kernel under qemu-system-x86_64
# and run the image's boot job: as the unprivileged user `build`, `rbuild doctor`, a build with RUN steps,
# and the metacopy benchmark (kernel-patches/metacopy-bench.sh). Prints the serial console.
# Opt-in (minutes under software emulation; not run in CI):
#   kernel-patches/boot-test.sh OSDIR [EXTRA KERNEL ARGS]
# OSDIR holds vmlinuz, root.img and state.img. KVM is used when /dev/kvm works, else TCG.
# Environment: MEM (default 4096 MiB), CPUS (default 2), TIMEOUT (default 3600 s).
set -eu
os=${1:?usage: boot-test.sh OSDIR [KERNEL ARGS]}
shift
accel=tcg
if [ -w /dev/kvm ] && grep -qE 'vmx|svm' /proc/cpuinfo; then accel=kvm; fi
echo "boot-test: $(date -u +%FT%TZ), accel $accel, kernel $os/vmlinuz"
start=$(date +%s)
status=0
timeout "${TIMEOUT:-3600}" qemu-system-x86_64 -accel "$accel" -m "${MEM:-4096}" -smp "${CPUS:-2}" \
    -nographic -no-reboot -serial mon:stdio -display none \
    -kernel "$os/vmlinuz" \
    -append "console=ttyS0 root=/dev/vda ro rootfstype=ext4 init=/usr/lib/rbuild-os/init panic=-1 rbuild.run=/usr/lib/rbuild-os/boot-job $*" \
    -drive "file=$os/root.img,format=raw,if=virtio" \
    -drive "file=$os/state.img,format=raw,if=virtio" || status=$?
echo "boot-test: qemu exited with status $status after $(( $(date +%s) - start )) s"
exit "$status"
