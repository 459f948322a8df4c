#!/usr/bin/env bash
# Build mirrorvm's guest Linux: an ELF vmlinux, a bzImage and a busybox
# initramfs, from Debian's linux-source-6.1 with tinyconfig + config.fragment.
#
#   resources/linux/build.sh            # from any directory
#
# Environment:
#   MIRRORVM_LINUX_DIR      cache/output directory (default: resources/linux/build)
#   MIRRORVM_LINUX_TARBALL  kernel source tarball (default: Debian's linux-source-6.1)
#   MIRRORVM_LINUX_VERBOSE  1: stream the make output instead of logging it
#
# Outputs: $DIR/out/vmlinux, $DIR/out/bzImage, $DIR/out/initramfs.cpio.gz
# (and the same archive uncompressed, $DIR/out/initramfs.cpio).
# A rerun whose inputs (this script, config.fragment, the tarball, busybox)
# are unchanged only prints the output paths.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${MIRRORVM_LINUX_DIR:-$HERE/build}"
TARBALL="${MIRRORVM_LINUX_TARBALL:-/usr/src/linux-source-6.1.tar.xz}"
FRAGMENT="$HERE/config.fragment"
VERBOSE="${MIRRORVM_LINUX_VERBOSE:-0}"
BUSYBOX=/bin/busybox
JOBS="$(nproc)"
START=$SECONDS

say() { printf '[linux %4ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '[linux] ERROR: %s\n' "$*" >&2; exit 1; }

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
SRC="$DIR/src"
OBJ="$DIR/obj"
OUT="$DIR/out"
LOGS="$DIR/logs"

# One build per directory at a time: a second caller (e.g. tests started in
# parallel) waits here and then finds the outputs up to date.
exec 9>"$DIR/.lock"
if ! flock -n 9; then
    say "another build is running in $DIR; waiting for it"
    flock 9
fi

# --- host packages -----------------------------------------------------------
# CI starts from a fresh Debian machine as root: install what is missing.
ensure_packages() {
    local missing=()
    command -v gcc >/dev/null || missing+=(build-essential)
    command -v make >/dev/null || missing+=(make)
    command -v flex >/dev/null || missing+=(flex)
    command -v bison >/dev/null || missing+=(bison)
    command -v bc >/dev/null || missing+=(bc)
    command -v xz >/dev/null || missing+=(xz-utils)
    command -v lz4 >/dev/null || missing+=(lz4)
    command -v gzip >/dev/null || missing+=(gzip)
    command -v cpio >/dev/null || missing+=(cpio)
    [ -e /usr/include/libelf.h ] || missing+=(libelf-dev)
    [ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    if [ -z "${MIRRORVM_LINUX_TARBALL:-}" ] && [ ! -e "$TARBALL" ]; then
        missing+=(linux-source-6.1)
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing missing packages: ${missing[*]}"
        [ "$(id -u)" = 0 ] || die "need root to apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    [ -e "$TARBALL" ] || die "kernel source tarball not found: $TARBALL"
    [ -x "$BUSYBOX" ] || die "busybox not found at $BUSYBOX"
}

# --- the four source edits ---------------------------------------------------
# Each one skips code that KVM's instruction emulator cannot run at CPL0 on the
# software-nested (kvm_pvm) hosts; see README.md. Each is checked: the original
# line must be present exactly once (or the edit must already be in place).
edit_line() { # file original replacement
    local file="$1" orig="$2" repl="$3" n
    [ -f "$file" ] || die "edit: $file does not exist"
    n="$(grep -cxF -- "$orig" "$file" || true)"
    if [ "$n" = 1 ]; then
        local tmp="$file.mirrorvm-tmp"
        ORIG="$orig" REPL="$repl" awk '$0 == ENVIRON["ORIG"] { print ENVIRON["REPL"]; next } { print }' \
            "$file" >"$tmp"
        mv "$tmp" "$file"
        grep -qxF -- "$repl" "$file" || die "edit: replacement not found in $file after editing"
        say "edited ${file#"$SRC"/}"
    elif [ "$n" = 0 ] && grep -qxF -- "$repl" "$file"; then
        say "edit already in place: ${file#"$SRC"/}"
    else
        die "edit: expected exactly one line '$orig' in $file, found $n"
    fi
}

apply_edits() {
    # 1. int3_selftest() executes int3 at CPL0; the emulator cannot.
    edit_line "$SRC/arch/x86/kernel/alternative.c" \
        $'\tint3_selftest();' \
        $'\t/* int3_selftest(); -- skipped by mirrorvm: int3 at CPL0 is not emulated */'
    # 2. The X86_BUG_FXSAVE_LEAK workaround runs fnclex/emms/fild on every FPU
    #    restore on AMD; never set the bug bit, so the workaround never runs.
    edit_line "$SRC/arch/x86/kernel/cpu/amd.c" \
        $'\t\tset_cpu_bug(c, X86_BUG_FXSAVE_LEAK);' \
        $'\t\t; /* set_cpu_bug(c, X86_BUG_FXSAVE_LEAK); -- skipped by mirrorvm: fnclex/fild are not emulated */'
    # 3. fpu__drop() executes fwait; the emulator cannot. A nop keeps the
    #    exception-table labels around it intact.
    edit_line "$SRC/arch/x86/kernel/fpu/core.c" \
        $'\t\tasm volatile("1: fwait\\n"' \
        $'\t\tasm volatile("1: nop\\n" /* mirrorvm: was fwait, not emulated */'
    # 4. tick_handle_periodic() replays every missed tick once kvm-clock is the
    #    clocksource, interrupts off, until it has caught up. Until the
    #    high-resolution tick takes over, a tick emulated at CPL0 can outlast its
    #    period on a busy host, and then the replay never ends (README.md, "Timer
    #    tick"). Skip missed ticks instead of replaying them.
    edit_line "$SRC/kernel/time/tick-common.c" \
        $'\t\tif (timekeeping_valid_for_hres())' \
        $'\t\tif (0) /* mirrorvm: was timekeeping_valid_for_hres(); missed ticks are skipped, not replayed */'
}

# --- cache keys -------------------------------------------------------------
tarball_id() { stat -c '%n %s %Y' "$(readlink -f "$TARBALL")"; }
SRC_KEY="$( { tarball_id; declare -f edit_line apply_edits; } | sha256sum | cut -c1-16)"
INPUT_KEY="$( { tarball_id; cat "$FRAGMENT" "${BASH_SOURCE[0]}"; stat -c '%s %Y' "$BUSYBOX" 2>/dev/null || true; } \
    | sha256sum | cut -c1-16)"

print_outputs() {
    say "vmlinux:   $OUT/vmlinux"
    say "bzImage:   $OUT/bzImage"
    say "initramfs: $OUT/initramfs.cpio.gz (uncompressed: $OUT/initramfs.cpio)"
}

if [ -f "$OUT/.inputs" ] && [ "$(cat "$OUT/.inputs")" = "$INPUT_KEY" ] \
    && [ -s "$OUT/vmlinux" ] && [ -s "$OUT/bzImage" ] && [ -s "$OUT/initramfs.cpio.gz" ] \
    && [ -s "$OUT/initramfs.cpio" ]; then
    say "up to date (inputs $INPUT_KEY), nothing to build"
    print_outputs
    exit 0
fi

ensure_packages
mkdir -p "$LOGS" "$OUT"
rm -f "$OUT/.inputs"

run_logged() { # name command...
    local name="$1"; shift
    local log="$LOGS/$name.log"
    if [ "$VERBOSE" = 1 ]; then
        "$@" 2>&1 | tee "$log"
    elif ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "$name failed; full log: $log"
    fi
}

# --- source tree ------------------------------------------------------------
if [ ! -f "$SRC/.mirrorvm-src" ] || [ "$(cat "$SRC/.mirrorvm-src")" != "$SRC_KEY" ]; then
    say "extracting $(basename "$TARBALL") into $SRC"
    rm -rf "$SRC" "$OBJ"
    mkdir -p "$SRC"
    tar -xf "$TARBALL" -C "$SRC" --strip-components=1
    [ -f "$SRC/Makefile" ] || die "no Makefile at the top of $TARBALL"
    apply_edits
    echo "$SRC_KEY" >"$SRC/.mirrorvm-src"
else
    say "source tree is ready ($SRC)"
fi
KVER="$(make -s -C "$SRC" kernelversion)"
say "kernel $KVER"

# --- configuration -------------------------------------------------------------
KMAKE=(make -C "$SRC" O="$OBJ" ARCH=x86_64)
mkdir -p "$OBJ"
say "configuring: tinyconfig + config.fragment"
run_logged config-tiny "${KMAKE[@]}" tinyconfig
run_logged config-merge env KCONFIG_CONFIG="$OBJ/.config" \
    "$SRC/scripts/kconfig/merge_config.sh" -m -O "$OBJ" "$OBJ/.config" "$FRAGMENT"
run_logged config-old "${KMAKE[@]}" olddefconfig

# Every option the fragment names must have the value it asks for.
bad=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qxF -- "$line" "$OBJ/.config" || {
                echo "  wanted '$line', got '$(grep -E "^(# )?${line%%=*}[= ]" "$OBJ/.config" || echo unset)'" >&2
                bad=1
            } ;;
        "# CONFIG_"*" is not set")
            opt="${line#\# }"; opt="${opt%% *}"
            if grep -qE "^$opt=" "$OBJ/.config"; then
                echo "  wanted '$line', got '$(grep -E "^$opt=" "$OBJ/.config")'" >&2
                bad=1
            fi ;;
    esac
done <"$FRAGMENT"
[ "$bad" = 0 ] || die "config.fragment did not apply cleanly (see above)"
say "config checked: every fragment option holds"

# --- kernel -----------------------------------------------------------------
say "building vmlinux and bzImage with make -j$JOBS (2-4 minutes on 2 cores; log: $LOGS/kernel.log)"
t0=$SECONDS
run_logged kernel "${KMAKE[@]}" -j"$JOBS" vmlinux bzImage
say "kernel built in $((SECONDS - t0)) s"
cp "$OBJ/vmlinux" "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
cp "$OBJ/arch/x86/boot/bzImage" "$OUT/bzImage.tmp" && mv "$OUT/bzImage.tmp" "$OUT/bzImage"
cp "$OBJ/.config" "$OUT/config"

# --- initramfs --------------------------------------------------------------
# Built with the kernel's own gen_init_cpio, so device nodes need no root and
# the archive does not depend on the files' owners.
say "building the busybox initramfs"
GEN="$DIR/gen_init_cpio"
gcc -O2 -o "$GEN" "$SRC/usr/gen_init_cpio.c"
IRD="$DIR/initramfs"
rm -rf "$IRD"
mkdir -p "$IRD"
cat >"$IRD/init" <<'EOF'
#!/bin/busybox sh
# mirrorvm initramfs: mount the pseudo file systems, the virtio disk if there
# is one, then give the console a shell.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
if [ -b /dev/vda ]; then
    if mount /dev/vda /mnt; then
        echo "mirrorvm-init: /dev/vda mounted on /mnt"
    else
        echo "mirrorvm-init: /dev/vda present but could not be mounted"
    fi
else
    echo "mirrorvm-init: no /dev/vda"
fi
echo "mirrorvm-init: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) cpu(s); starting a shell"
exec setsid cttyhack /bin/sh
EOF
cp "$BUSYBOX" "$IRD/busybox"
# gen_init_cpio stores a regular file's own mtime: pin it, for a reproducible archive.
touch -d @0 "$IRD/init" "$IRD/busybox"
cat >"$IRD/list" <<EOF
dir /bin 0755 0 0
dir /sbin 0755 0 0
dir /usr 0755 0 0
dir /usr/bin 0755 0 0
dir /usr/sbin 0755 0 0
dir /dev 0755 0 0
dir /proc 0555 0 0
dir /sys 0555 0 0
dir /mnt 0755 0 0
dir /tmp 1777 0 0
dir /root 0700 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
file /bin/busybox $IRD/busybox 0755 0 0
slink /bin/sh busybox 0777 0 0
file /init $IRD/init 0755 0 0
EOF
# Also kept uncompressed: where the kernel runs emulated (kvm_pvm), inflating
# the archive costs about a minute and copying the plain one about 10 s.
"$GEN" -t 0 "$IRD/list" >"$OUT/initramfs.cpio.tmp"
gzip -9 -n <"$OUT/initramfs.cpio.tmp" >"$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.tmp" "$OUT/initramfs.cpio"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"

echo "$INPUT_KEY" >"$OUT/.inputs"
say "done in $((SECONDS - START)) s (inputs $INPUT_KEY)"
ls -l "$OUT/vmlinux" "$OUT/bzImage" "$OUT/initramfs.cpio.gz" "$OUT/initramfs.cpio" | sed 's/^/    /'
print_outputs
