/*
 * mirrorvm test guest: write the disk workload's records into an image file
 * on the host, with the guest's own C code (used to cross-check
 * verify-disk.py).  usage: mkimage IMAGE RECORDS SEED
 */
#include <stdio.h>
#include <stdlib.h>

#include "record.h"

int main(int argc, char **argv)
{
    static uint8_t buf[REC_SIZE];
    FILE *f;
    long size;
    uint32_t i, n;
    uint64_t seed, cap;

    if (argc != 4) {
        fprintf(stderr, "usage: mkimage IMAGE RECORDS SEED\n");
        return 2;
    }
    n = (uint32_t)strtoul(argv[2], NULL, 0);
    seed = strtoull(argv[3], NULL, 0);
    f = fopen(argv[1], "r+b");
    if (!f || fseek(f, 0, SEEK_END) || (size = ftell(f)) < 0) {
        perror(argv[1]);
        return 1;
    }
    cap = (uint64_t)size / 512;
    if (n == 0 || n > record_slots(cap)) {
        fprintf(stderr, "mkimage: %u records do not fit\n", n);
        return 1;
    }
    for (i = 0; i < n; i++) {
        uint64_t sector = record_sector(i, n, cap);
        record_fill(buf, i, n, sector, seed);
        if (fseek(f, (long)(sector * 512), SEEK_SET) || fwrite(buf, 1, REC_SIZE, f) != REC_SIZE) {
            perror("write");
            return 1;
        }
    }
    return fclose(f) ? 1 : 0;
}
