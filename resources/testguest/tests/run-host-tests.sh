#!/bin/sh
# mirrorvm test guest: build the pure C parts for the host and run their unit
# tests, then check verify-disk.py (an independent implementation of the
# record format in README.md) against records made by the guest's C code.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=$(dirname "$here")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

gcc -std=gnu11 -O2 -g -Wall -Wextra -Werror -fsanitize=address,undefined \
    -I "$src" -o "$out/host_test" \
    "$here/host_test.c" "$src/util.c" "$src/cmdline.c" "$src/crc32c.c" "$src/record.c"
"$out/host_test"

gcc -std=gnu11 -O2 -Wall -Wextra -Werror -I "$src" -o "$out/mkimage" \
    "$here/mkimage.c" "$src/util.c" "$src/crc32c.c" "$src/record.c"
truncate -s 8M "$out/disk.img"
"$out/mkimage" "$out/disk.img" 50 12345
python3 "$here/verify-disk.py" "$out/disk.img" --records 50 --seed 12345
# a corrupted byte must be caught
printf 'X' | dd of="$out/disk.img" bs=1 seek=$((8 * 512 * 2 * 0 + 300)) conv=notrunc status=none
if python3 "$here/verify-disk.py" "$out/disk.img" --records 50 --seed 12345 >/dev/null 2>&1; then
    echo "verify-disk.py missed a corrupted record" >&2
    exit 1
fi
echo "verify-disk.py: ok (accepts the C records, rejects a corrupted one)"
