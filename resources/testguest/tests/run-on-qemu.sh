#!/bin/sh
# mirrorvm test guest: run a workload on QEMU's microvm machine as a
# reference (the guest also has a PVH entry for this), e.g. to compare how
# QEMU's virtio-blk and mirrorvm's handle the hostile cases.  Needs
# qemu-system-x86 (Debian package qemu-system-x86) and /dev/kvm.
#
# usage: run-on-qemu.sh [-e testguest.elf] [-d disk.img] [-c cpus] CMDLINE...
#   default ELF: the newest under ${CARGO_TARGET_DIR:-target}
# Exit status: the guest's (QEMU's isa-debug-exit status (v << 1) | 1 is
# translated back).
set -eu
elf= disk= cpus=1
while getopts e:d:c: o; do
    case $o in
    e) elf=$OPTARG ;;
    d) disk=$OPTARG ;;
    c) cpus=$OPTARG ;;
    *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ -z "$elf" ]; then
    root=$(cd "$(dirname "$0")/../../.." && pwd)
    elf=$(ls -t "${CARGO_TARGET_DIR:-$root/target}"/*/build/vmm-*/out/testguest.elf 2>/dev/null | head -n 1 || true)
    [ -n "$elf" ] || { echo "run-on-qemu: no testguest.elf (cargo build -p vmm first)" >&2; exit 2; }
fi
set -- -M microvm,acpi=off -enable-kvm -cpu kvm64,+invtsc,vmware-cpuid-freq=on \
    -m 256M -smp "$cpus" -nodefaults -no-user-config -nographic -no-reboot \
    -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=4 \
    -kernel "$elf" -append "$*"
if [ -n "$disk" ]; then
    set -- "$@" -global virtio-mmio.force-legacy=false \
        -drive "id=d0,file=$disk,format=raw,if=none" -device virtio-blk-device,drive=d0
fi
rc=0
timeout 300 qemu-system-x86_64 "$@" || rc=$?
if [ $((rc & 1)) -eq 1 ]; then
    exit $((rc >> 1))
fi
echo "run-on-qemu: qemu ended with status $rc (not through the debug exit port)" >&2
exit 125
