/*
 * mirrorvm test guest: the `disk` workload, and the device discovery shared
 * with `hostile`.
 */
#include "cmdline.h"
#include "crc32c.h"
#include "guest.h"
#include "record.h"
#include "virtio_blk.h"

static uint8_t recbuf[REC_SIZE] __attribute__((aligned(4096)));

int find_blk(const struct cmdline *cl, struct vblk *d, const char *who)
{
    int i;
    if (cl->ndevs == 0) {
        print("%s: FAILED: no virtio_mmio.device= entry on the command line "
              "(run with a disk)\n", who);
        return -1;
    }
    for (i = 0; i < cl->ndevs; i++) {
        if (vblk_probe(d, (uintptr_t)cl->devs[i].base) == 0)
            return 0;
        print("%s: skipping device %d: %s\n", who, i, d->err);
    }
    print("%s: FAILED: no virtio-blk device among %d virtio-mmio device(s)\n", who, cl->ndevs);
    return -1;
}

static int get_id(struct vblk *d, const char *who)
{
    static char id[VIRTIO_BLK_ID_BYTES + 1] __attribute__((aligned(64)));
    uint8_t st;
    enum vb_outcome o;
    int i;

    mem_fill(id, 0, sizeof id);
    o = vblk_request(d, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES, 1, 0, &st);
    if (o != VB_DONE) {
        print("%s: FAILED: GET_ID %s\n", who, vb_outcome_name(o));
        return -1;
    }
    if (st != VIRTIO_BLK_S_OK) {
        print("%s: warning: GET_ID answered %s\n", who, vb_status_name(st));
        return 0;
    }
    for (i = 0; i < VIRTIO_BLK_ID_BYTES && id[i]; i++)
        if (id[i] < 0x20 || id[i] > 0x7e)
            id[i] = '?';
    print("%s: device id \"%s\"\n", who, id);
    return 0;
}

static int rw_record(struct vblk *d, int write, uint32_t i, uint64_t sector, const char *who)
{
    uint8_t st;
    enum vb_outcome o = vblk_request(d, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, sector,
                                     recbuf, REC_SIZE, !write, i & 1, &st);
    if (o != VB_DONE || st != VIRTIO_BLK_S_OK) {
        print("%s: FAILED: %s of record %u at sector %llu: %s, status %s (0x%02x)\n", who,
              write ? "write" : "read", i, (unsigned long long)sector, vb_outcome_name(o),
              vb_status_name(st), st);
        return -1;
    }
    return 0;
}

int disk_open(const struct cmdline *cl, struct vblk *d, const char *who)
{
    if (find_blk(cl, d, who))
        return -1;
    if (vblk_init(d)) {
        print("%s: FAILED: initialising virtio-blk at 0x%llx: %s\n", who,
              (unsigned long long)d->base, d->err);
        return -1;
    }
    print("%s: virtio-blk at 0x%llx: %llu sectors (%llu MiB), features 0x%llx "
          "(accepted 0x%llx), queue size %u of %u\n",
          who, (unsigned long long)d->base, (unsigned long long)d->capacity,
          (unsigned long long)(d->capacity >> 11), (unsigned long long)d->dev_features,
          (unsigned long long)d->features, d->qsize, d->qmax);
    return get_id(d, who);
}

int disk_round(struct vblk *d, uint32_t n, uint64_t seed, uint64_t r, const char *who)
{
    uint32_t i;
    uint8_t st;
    enum vb_outcome o;
    char why[128];

    for (i = 0; i < n; i++) {
        uint64_t sector = record_sector(i, n, d->capacity);
        if (r > 0) {
            mem_fill(recbuf, 0xa5, sizeof recbuf);
            if (rw_record(d, 0, i, sector, who))
                return -1;
            if (record_check(recbuf, i, n, sector, seed + r - 1, why, sizeof why)) {
                print("%s: FAILED: round %llu: record %u at sector %llu: %s\n", who,
                      (unsigned long long)r + 1, i, (unsigned long long)sector, why);
                return -1;
            }
        }
        record_fill(recbuf, i, n, sector, seed + r);
        if (rw_record(d, 1, i, sector, who))
            return -1;
    }
    if (d->features & (1ull << VIRTIO_BLK_F_FLUSH)) {
        o = vblk_request(d, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0, 0, &st);
        if (o != VB_DONE || st != VIRTIO_BLK_S_OK) {
            print("%s: FAILED: FLUSH %s, status %s\n", who, vb_outcome_name(o),
                  vb_status_name(st));
            return -1;
        }
    } else if (r == 0) {
        print("%s: warning: no VIRTIO_BLK_F_FLUSH offered, not flushing\n", who);
    }
    return 0;
}

int disk_verify(struct vblk *d, uint32_t n, uint64_t seed, const char *who)
{
    uint32_t i, bad = 0;
    char why[128];

    for (i = 0; i < n; i++) {
        uint64_t sector = record_sector(i, n, d->capacity);
        mem_fill(recbuf, 0xa5, sizeof recbuf);
        if (rw_record(d, 0, i, sector, who))
            return -1;
        if (record_check(recbuf, i, n, sector, seed, why, sizeof why)) {
            if (bad < 10)
                print("%s: record %u at sector %llu: %s\n", who, i,
                      (unsigned long long)sector, why);
            bad++;
        }
    }
    if (bad) {
        print("%s: FAILED: %u of %u records do not verify\n", who, bad, n);
        return -1;
    }
    return 0;
}

int wl_disk(const struct cmdline *cl_in)
{
    static const char *const keys[] = { "records", "seed", "mode", "rounds", NULL };
    static struct vblk dev;
    struct vblk *d = &dev;
    struct cmdline *cl = (struct cmdline *)cl_in;
    uint64_t n, seed, rounds, r, t0;
    int do_write = 1, do_verify = 1;
    const char *mode;
    size_t mlen;

    if (cmdline_check_keys(cl, keys) || cmdline_u64(cl, "records", 64, 1, 0xffffffffu, &n) ||
        cmdline_u64(cl, "seed", 1, 0, UINT64_MAX, &seed) ||
        cmdline_u64(cl, "rounds", 1, 0, UINT64_MAX, &rounds))
        goto usage;
    mode = cmdline_str(cl, "mode", &mlen);
    if (mode && str_eqn(mode, mlen, "write"))
        do_verify = 0;
    else if (mode && str_eqn(mode, mlen, "verify"))
        do_write = 0;
    else if (mode && !str_eqn(mode, mlen, "both")) {
        fmt_snprintf(cl->err, sizeof cl->err, "mode must be write, verify or both");
        goto usage;
    }

    if (disk_open(cl, d, "disk"))
        return EXIT_FAIL;
    if (n > record_slots(d->capacity)) {
        fmt_snprintf(cl->err, sizeof cl->err,
                     "records=%llu do not fit the disk (%llu slots of %u sectors)",
                     (unsigned long long)n, (unsigned long long)record_slots(d->capacity),
                     REC_SECTORS);
        goto usage;
    }
    if (do_write && (d->features & (1ull << VIRTIO_BLK_F_RO))) {
        print("disk: FAILED: the disk is read-only\n");
        return EXIT_FAIL;
    }

    /* Round r writes every record with seed + r.  From the second round on,
     * each record is first read back and must hold round r-1: the disk has
     * to agree with what the guest's memory says it wrote last, across
     * checkpoints, restores and failovers. */
    for (r = 0; do_write && (rounds == 0 || r < rounds); r++) {
        t0 = rdtsc();
        if (disk_round(d, (uint32_t)n, seed, r, "disk"))
            return EXIT_FAIL;
        if (rounds == 1)
            print("disk: wrote %llu records (seed %llu) and flushed in %llu ms\n",
                  (unsigned long long)n, (unsigned long long)seed,
                  (unsigned long long)ticks_to_ms(rdtsc() - t0));
        else
            print("disk: round %llu: %s%llu records (seed %llu) and flushed in %llu ms\n",
                  (unsigned long long)r + 1, r ? "checked and rewrote " : "wrote ",
                  (unsigned long long)n, (unsigned long long)(seed + r),
                  (unsigned long long)ticks_to_ms(rdtsc() - t0));
    }
    if (do_write)
        seed += rounds - 1;   /* what the disk holds now */

    if (do_verify) {
        t0 = rdtsc();
        if (disk_verify(d, (uint32_t)n, seed, "disk"))
            return EXIT_FAIL;
        print("disk: read back in %llu ms\n", (unsigned long long)ticks_to_ms(rdtsc() - t0));
        print("disk: %llu records verified\n", (unsigned long long)n);
    } else {
        print("disk: %llu records written\n", (unsigned long long)n);
    }
    return EXIT_OK;

usage:
    print("disk: error: %s\n", cl->err);
    print("disk: usage: disk [records=N] [seed=S] [mode=both|write|verify] [rounds=R]\n");
    return EXIT_USAGE;
}
