#!/bin/sh
# mirrorvm test guest: check that the code run at CPL0 (and in real mode) uses
# none of the instructions the test machines' KVM emulator lacks (see
# /work/shared/ENVIRONMENT.md and README.md here), and that it never calls
# into compiler output.
#
# usage: check-cpl0.sh [testguest.elf]
#   default: the newest testguest.elf under ${CARGO_TARGET_DIR:-target}
set -eu

elf=${1:-}
if [ -z "$elf" ]; then
    root=$(cd "$(dirname "$0")/../.." && pwd)
    tdir=${CARGO_TARGET_DIR:-$root/target}
    elf=$(ls -t "$tdir"/*/build/vmm-*/out/testguest.elf 2>/dev/null | head -n 1 || true)
    [ -n "$elf" ] || { echo "check-cpl0: no testguest.elf under $tdir (cargo build -p vmm first)" >&2; exit 2; }
fi
[ -f "$elf" ] || { echo "check-cpl0: $elf not found" >&2; exit 2; }

sym() {
    v=$(nm "$elf" | awk -v s="$1" '$3 == s { print $1 }')
    [ -n "$v" ] || { echo "check-cpl0: symbol $1 missing from $elf" >&2; exit 2; }
    echo "0x$v"
}

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

# address<TAB>instruction, for a range disassembled in the given mode
dis() { # mode section [start stop]
    if [ $# -eq 4 ]; then
        objdump -d -w -M "$1" -j "$2" --start-address="$3" --stop-address="$4" "$elf"
    else
        objdump -d -w -M "$1" -j "$2" "$elf"
    fi | awk -F'\t' '/^ *[0-9a-f]+:\t/ && NF >= 3 { sub(/^ +/, "", $1); print $1 "\t" $3 }'
}

{
    dis x86-64 .text.cpl0 | sed 's/^/cpl0 /'
    dis i386 .text.pvh32 | sed 's/^/pvh  /'
    dis i8086 .trampoline "$(sym tramp_start)" "$(sym tramp_start32)" | sed 's/^/real /'
    dis i386 .trampoline "$(sym tramp_start32)" "$(sym tramp_start64)" | sed 's/^/prot /'
    dis x86-64 .trampoline "$(sym tramp_start64)" "$(sym tramp_data)" | sed 's/^/long /'
} > "$tmp"

n=$(wc -l < "$tmp")
[ "$n" -gt 50 ] || { echo "check-cpl0: only $n instructions disassembled: wrong file?" >&2; exit 2; }

# Forbidden at CPL0 under the emulator: x87 other than fninit (fxsave/fxrstor
# are fine), SSE/AVX/MMX (any xmm/ymm/zmm/mm register or v-prefixed
# instruction), xsave family and xgetbv/xsetbv, int3/int n/into/int1,
# vmcall/vmmcall/vmfunc, rdtscp, rep-prefixed string instructions, and
# undecodable bytes (data in a code range, or a wrong mode).
# The one deliberate exception: the vmcall of SYS_HANG (fault kind=vmcall).
allow=$(nm "$elf" | awk '$3 == "deliberate_vmcall" { sub(/^0+/, "", $1); print $1 }')
bad=$(awk -F'\t' -v allow="cpl0 ${allow:-none}:" '
    $1 == allow { next }
    {
        where = $1; ins = $2
        gsub(/^ +| +$/, "", ins)
        m = ins; sub(/ .*/, "", m)
        why = ""
        if (ins ~ /\(bad\)/) why = "undecodable"
        else if (m ~ /^(rep|repz|repe|repnz|repne)$/) why = "rep string instruction"
        else if (m ~ /^f/ && m !~ /^(fninit|fxsave|fxsave64|fxrstor|fxrstor64)$/) why = "x87"
        else if (m ~ /^(wait|fwait)$/) why = "x87 wait"
        else if (ins ~ /%([xyz]mm[0-9]|mm[0-7])/) why = "SSE/AVX/MMX register"
        else if (m ~ /^(vmcall|vmmcall|vmfunc)$/) why = "hypercall"
        else if (m ~ /^v/ && m !~ /^(verr|verw)$/) why = "AVX/VMX"
        else if (m ~ /^(xsave|xrstor|xgetbv|xsetbv)/) why = "xsave family"
        else if (m ~ /^(int3|int|into|int1|icebp)$/) why = "software interrupt"
        else if (m == "rdtscp") why = "rdtscp"
        if (why != "") print "  " where " " ins "   <- " why
    }' "$tmp")

# Calls and direct jumps from CPL0 code must stay inside the CPL0 text.
lo=$(printf '%d' "$(sym isr_stubs)")
hi=$(( lo + $(objdump -h -w "$elf" | awk '$2 == ".text.cpl0" { print "0x" $3 }') ))
escapes=$(awk -F'\t' -v lo="$lo" -v hi="$hi" '
    $1 ~ /^cpl0 / && $2 ~ /^(call|jmp|j[a-z]+) +[0-9a-f]+ </ {
        t = $2; sub(/^[a-z]+ +/, "", t); sub(/ .*/, "", t)
        v = 0
        for (i = 1; i <= length(t); i++) v = v * 16 + index("0123456789abcdef", substr(t, i, 1)) - 1
        if (v < lo || v >= hi) print "  " $1 " " $2 "   <- leaves the CPL0 text"
    }' "$tmp")

if [ -n "$bad$escapes" ]; then
    echo "check-cpl0: FAILED for $elf:" >&2
    [ -z "$bad" ] || echo "$bad" >&2
    [ -z "$escapes" ] || echo "$escapes" >&2
    exit 1
fi
echo "check-cpl0: ok, $n CPL0/real-mode instructions in $elf, none forbidden"
