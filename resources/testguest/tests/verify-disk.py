#!/usr/bin/env python3
"""Verify the records the test guest's `disk` workload wrote into a disk image.

An independent implementation of the record format documented in
resources/testguest/README.md (it shares no code with the guest), for host
tests: every record's magic, CRC32C, index, count, sector, seed and payload.

usage: verify-disk.py IMAGE [--records N] [--seed S]
  N and S default to what record 0 says.  Exit status 0 if all records verify.
"""
import argparse
import os
import struct
import sys

REC_SIZE = 4096
REC_SECTORS = 8
MAGIC = b"MVMREC01"
M64 = (1 << 64) - 1


def _crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def payload(seed, index):
    state = seed ^ (index << 32)
    words = []
    for _ in range((0xFFC - 0x20) // 4):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        words.append(z & 0xFFFFFFFF)
    return struct.pack("<%dI" % len(words), *words)


def record_sector(i, n, capacity):
    slots = capacity // REC_SECTORS
    return (i * slots // n) * REC_SECTORS


def check_record(rec, i, n, sector, seed):
    if rec[0:8] != MAGIC:
        return "bad magic %r" % rec[0:8]
    stored = struct.unpack_from("<I", rec, 0xFFC)[0]
    if crc32c(rec[:0xFFC]) != stored:
        return "CRC32C mismatch (stored 0x%08x)" % stored
    index, count, rsector, rseed = struct.unpack_from("<IIQQ", rec, 8)
    if (index, count) != (i, n):
        return "holds record %d of %d" % (index, count)
    if rsector != sector:
        return "says sector %d" % rsector
    if rseed != seed:
        return "seed %d, expected %d" % (rseed, seed)
    if rec[0x20:0xFFC] != payload(seed, i):
        return "payload differs"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--records", type=lambda s: int(s, 0))
    ap.add_argument("--seed", type=lambda s: int(s, 0))
    args = ap.parse_args()

    capacity = os.path.getsize(args.image) // 512
    with open(args.image, "rb") as f:
        first = f.read(REC_SIZE)
        if len(first) < REC_SIZE or first[0:8] != MAGIC:
            print("%s: no record at sector 0" % args.image, file=sys.stderr)
            return 1
        n = args.records if args.records is not None else struct.unpack_from("<I", first, 12)[0]
        seed = args.seed if args.seed is not None else struct.unpack_from("<Q", first, 0x18)[0]
        if n < 1 or n > capacity // REC_SECTORS:
            print("%s: %d records do not fit %d sectors" % (args.image, n, capacity), file=sys.stderr)
            return 1
        bad = 0
        for i in range(n):
            sector = record_sector(i, n, capacity)
            f.seek(sector * 512)
            why = check_record(f.read(REC_SIZE), i, n, sector, seed)
            if why:
                bad += 1
                print("record %d at sector %d: %s" % (i, sector, why), file=sys.stderr)
    if bad:
        print("%s: %d of %d records FAILED" % (args.image, bad, n), file=sys.stderr)
        return 1
    print("%s: %d records verified (seed %d)" % (args.image, n, seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
