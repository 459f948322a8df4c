/*
 * mirrorvm test guest: the `hostile` workload.  Submits malformed requests
 * to the virtio-blk device, one at a time.  For each, the device must either
 * complete it with IOERR/UNSUPP in the status byte (when the request has a
 * usable status byte), or set DEVICE_NEEDS_RESET; requests with no usable
 * status byte may also just be completed (returned on the used ring).  It
 * must never report success, write outside the chain, or hang.  After
 * DEVICE_NEEDS_RESET (or a timeout) the driver resets and re-initialises
 * the device.  Finally a normal write + read proves the device still works.
 */
#include "cmdline.h"
#include "guest.h"
#include "record.h"
#include "virtio_blk.h"

#define CASE_TIMEOUT_MS 3000
#define FAR_AWAY        (1ull << 46)   /* far beyond any guest RAM */

static struct blk_req_hdr hdr __attribute__((aligned(64)));
static volatile uint8_t status_byte __attribute__((aligned(64)));
static uint8_t buf[2 * REC_SIZE] __attribute__((aligned(4096)));
static struct vblk dev;
static uint64_t ram_end;

struct hcase {
    const char *name;
    int has_status;     /* the chain has a usable device-writable status byte */
    /* build the chain; return the head index to submit */
    uint16_t (*build)(struct vblk *d);
    int rings;          /* also place ring 1 (descriptors), 2 (avail), 3 (used)
                           outside guest memory at queue setup; 4: advance the
                           avail index by more than the queue size */
};

static void set_desc(struct vblk *d, uint16_t i, uint64_t addr, uint32_t len, uint16_t flags,
                     uint16_t next)
{
    d->desc[i].addr = addr;
    d->desc[i].len = len;
    d->desc[i].flags = flags;
    d->desc[i].next = next;
}

static void set_hdr(uint32_t type, uint64_t sector)
{
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
}

#define NEXT VRING_DESC_F_NEXT
#define WR   VRING_DESC_F_WRITE
#define A(p) ((uint64_t)(uintptr_t)(p))

/* read into a data buffer that lies outside guest memory */
static uint16_t b_data_outside(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    set_desc(d, 1, FAR_AWAY, 4096, WR | NEXT, 2);
    set_desc(d, 2, A(&status_byte), 1, WR, 0);
    return 0;
}

/* the request header lies outside guest memory */
static uint16_t b_hdr_outside(struct vblk *d)
{
    set_desc(d, 0, FAR_AWAY, sizeof hdr, NEXT, 1);
    set_desc(d, 1, A(buf), 4096, WR | NEXT, 2);
    set_desc(d, 2, A(&status_byte), 1, WR, 0);
    return 0;
}

/* a data buffer that starts in RAM and runs past its end */
static uint16_t b_data_straddles(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    set_desc(d, 1, ram_end - 2048, 4096, WR | NEXT, 2);
    set_desc(d, 2, A(&status_byte), 1, WR, 0);
    return 0;
}

/* header -> data -> data2 -> data (a cycle) */
static uint16_t b_loop(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    set_desc(d, 1, A(buf), 512, WR | NEXT, 2);
    set_desc(d, 2, A(buf + 512), 512, WR | NEXT, 1);
    return 0;
}

/* every descriptor of the table chained, the last pointing past the table
 * (where a well-formed status descriptor waits for a device that does not
 * bound the walk by the queue size) */
static uint16_t b_too_long(struct vblk *d)
{
    uint16_t i, q = d->qsize;
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    for (i = 1; i < q; i++)
        set_desc(d, i, A(buf + 512 * (i % 16)), 512, WR | NEXT, (uint16_t)(i + 1));
    set_desc(d, q, A(&status_byte), 1, WR, 0);
    return 0;
}

static uint16_t b_beyond_capacity(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_IN, d->capacity - 4);   /* 8 sectors, 4 past the end */
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    set_desc(d, 1, A(buf), 4096, WR | NEXT, 2);
    set_desc(d, 2, A(&status_byte), 1, WR, 0);
    return 0;
}

static uint16_t b_sector_overflow(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_IN, 0xfffffffffffffff8ull);   /* * 512 wraps to a small offset */
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    set_desc(d, 1, A(buf), 4096, WR | NEXT, 2);
    set_desc(d, 2, A(&status_byte), 1, WR, 0);
    return 0;
}

static uint16_t b_unknown_type(struct vblk *d)
{
    set_hdr(0x7f, 0);
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    set_desc(d, 1, A(buf), 512, WR | NEXT, 2);
    set_desc(d, 2, A(&status_byte), 1, WR, 0);
    return 0;
}

static uint16_t b_short_header(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, A(&hdr), 8, NEXT, 1);          /* type and reserved only */
    set_desc(d, 1, A(buf), 512, WR | NEXT, 2);
    set_desc(d, 2, A(&status_byte), 1, WR, 0);
    return 0;
}

static uint16_t b_writable_header(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, A(&hdr), sizeof hdr, WR | NEXT, 1);   /* no device-readable header */
    set_desc(d, 1, A(buf), 512, WR | NEXT, 2);
    set_desc(d, 2, A(&status_byte), 1, WR, 0);
    return 0;
}

static uint16_t b_zero_status(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_FLUSH, 0);
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    set_desc(d, 1, A(&status_byte), 0, WR, 0);
    return 0;
}

static uint16_t b_missing_status(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_OUT, 0);
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    set_desc(d, 1, A(buf), 4096, 0, 0);           /* data, then nothing writable */
    return 0;
}

static uint16_t b_head_out_of_range(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    set_desc(d, 1, A(buf), 512, WR | NEXT, 2);
    set_desc(d, 2, A(&status_byte), 1, WR, 0);
    return (uint16_t)(d->qsize + 3);              /* not a descriptor of the queue */
}

static uint16_t b_normal_read(struct vblk *d)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(d, 0, A(&hdr), sizeof hdr, NEXT, 1);
    set_desc(d, 1, A(buf), 512, WR | NEXT, 2);
    set_desc(d, 2, A(&status_byte), 1, WR, 0);
    return 0;
}

static const struct hcase cases[] = {
    { "data buffer outside guest memory", 1, b_data_outside, 0 },
    { "header outside guest memory", 1, b_hdr_outside, 0 },
    { "data buffer straddling the end of RAM", 1, b_data_straddles, 0 },
    { "descriptor chain loop", 0, b_loop, 0 },
    { "chain longer than the queue size", 0, b_too_long, 0 },
    { "read beyond the capacity", 1, b_beyond_capacity, 0 },
    { "sector number overflowing a byte offset", 1, b_sector_overflow, 0 },
    { "unknown request type", 1, b_unknown_type, 0 },
    { "header shorter than 16 bytes", 1, b_short_header, 0 },
    { "device-writable header", 1, b_writable_header, 0 },
    { "zero-length status descriptor", 0, b_zero_status, 0 },
    { "missing status descriptor", 0, b_missing_status, 0 },
    { "avail ring head out of range", 0, b_head_out_of_range, 0 },
    { "descriptor table outside guest memory", 0, b_normal_read, 1 },
    { "avail ring outside guest memory", 0, b_normal_read, 2 },
    { "used ring outside guest memory", 0, b_normal_read, 3 },
    { "avail index ahead by more than the queue size", 0, b_normal_read, 4 },
};
#define NCASES ((int)(sizeof cases / sizeof cases[0]))

static int reinit(struct vblk *d, const char *why)
{
    d->desc_addr = d->driver_addr = d->device_addr = 0;
    if (vblk_init(d)) {
        print("hostile:   re-initialising after %s FAILED: %s\n", why, d->err);
        return -1;
    }
    return 0;
}

/* Returns 1 if the case behaved. */
static int run_case(struct vblk *d, int k, int *dead)
{
    const struct hcase *c = &cases[k];
    enum vb_outcome o;
    uint32_t used_len = 0;
    uint16_t head;
    uint8_t st;
    int ok;
    char what[120];

    if (c->rings == 4) {
        d->avail_extra = d->qsize;    /* the device sees qsize + 1 new entries */
    } else if (c->rings) {
        if (c->rings == 1)
            d->desc_addr = FAR_AWAY;
        else if (c->rings == 2)
            d->driver_addr = FAR_AWAY;
        else
            d->device_addr = FAR_AWAY;
        if (vblk_init(d)) {
            /* refusing DRIVER_OK / raising NEEDS_RESET at once is fine too */
            uint32_t s = vb_read32(d, VMMIO_STATUS);
            ok = (s & VS_NEEDS_RESET) != 0;
            print("hostile: %2d %-46s %s: init: %s\n", k + 1, c->name, ok ? "ok  " : "FAIL",
                  d->err);
            if (reinit(d, "the case"))
                *dead = 1;
            return ok;
        }
    }
    status_byte = 0xff;
    mem_fill(buf, 0x5a, sizeof buf);
    head = c->build(d);
    o = vblk_submit(d, head, CASE_TIMEOUT_MS, &used_len);
    st = status_byte;

    switch (o) {
    case VB_NEEDS_RESET:
        ok = 1;
        fmt_snprintf(what, sizeof what, "DEVICE_NEEDS_RESET");
        break;
    case VB_DONE:
        if (c->has_status || st != 0xff) {
            ok = st == VIRTIO_BLK_S_IOERR || st == VIRTIO_BLK_S_UNSUPP;
            fmt_snprintf(what, sizeof what, "completed, status %s (0x%02x), used len %u%s",
                         vb_status_name(st), st, used_len,
                         ok ? "" : ": should be IOERR/UNSUPP or DEVICE_NEEDS_RESET");
        } else {
            ok = 1;
            fmt_snprintf(what, sizeof what, "completed without a status, used len %u",
                         used_len);
        }
        break;
    case VB_BAD_USED:
        ok = 0;
        fmt_snprintf(what, sizeof what, "used ring returned a descriptor id other than %u",
                     head);
        break;
    default:
        ok = 0;
        fmt_snprintf(what, sizeof what,
                     "no completion and no DEVICE_NEEDS_RESET within %u ms (status 0x%x)",
                     CASE_TIMEOUT_MS, vb_read32(d, VMMIO_STATUS));
        break;
    }
    print("hostile: %2d %-46s %s: %s\n", k + 1, c->name, ok ? "ok  " : "FAIL", what);
    if (o != VB_DONE || c->rings) {
        if (reinit(d, o == VB_NEEDS_RESET ? "DEVICE_NEEDS_RESET" : "the case"))
            *dead = 1;
    }
    return ok;
}

int wl_hostile(const struct cmdline *cl_in)
{
    static const char *const keys[] = { NULL };
    struct cmdline *cl = (struct cmdline *)cl_in;
    struct vblk *d = &dev;
    int k, good = 0, dead = 0;
    uint8_t st;
    enum vb_outcome o;
    char why[128];
    uint64_t sector;

    if (cmdline_check_keys(cl, keys)) {
        print("hostile: error: %s\n", cl->err);
        return EXIT_USAGE;
    }
    ram_end = machine_ram_end(IMAGE_BASE);
    if (find_blk(cl, d, "hostile"))
        return EXIT_FAIL;
    if (vblk_init(d)) {
        print("hostile: FAILED: initialising virtio-blk at 0x%llx: %s\n",
              (unsigned long long)d->base, d->err);
        return EXIT_FAIL;
    }
    print("hostile: virtio-blk at 0x%llx, %llu sectors, queue size %u; %d cases\n",
          (unsigned long long)d->base, (unsigned long long)d->capacity, d->qsize, NCASES);
    if (d->capacity < 16) {
        print("hostile: FAILED: disk too small (need 16 sectors)\n");
        return EXIT_FAIL;
    }

    for (k = 0; k < NCASES && !dead; k++)
        good += run_case(d, k, &dead);
    if (dead) {
        print("hostile: FAILED: the device could not be re-initialised; %d of %d cases run\n",
              k, NCASES);
        return EXIT_FAIL;
    }

    /* the device must still work: write a record at sector 8 and read it back */
    sector = 8;
    record_fill(buf, 0, 1, sector, 0x40571e);
    o = vblk_request(d, VIRTIO_BLK_T_OUT, sector, buf, REC_SIZE, 0, 1, &st);
    if (o == VB_DONE && st == VIRTIO_BLK_S_OK) {
        mem_fill(buf, 0, REC_SIZE);
        o = vblk_request(d, VIRTIO_BLK_T_IN, sector, buf, REC_SIZE, 1, 0, &st);
    }
    if (o != VB_DONE || st != VIRTIO_BLK_S_OK) {
        print("hostile: FAILED: normal write+read afterwards: %s, status %s\n",
              vb_outcome_name(o), vb_status_name(st));
        return EXIT_FAIL;
    }
    if (record_check(buf, 0, 1, sector, 0x40571e, why, sizeof why)) {
        print("hostile: FAILED: normal write+read afterwards: %s\n", why);
        return EXIT_FAIL;
    }
    print("hostile: device still works: write+read at sector %llu verified\n",
          (unsigned long long)sector);
    if (good != NCASES) {
        print("hostile: FAILED: %d of %d cases misbehaved\n", NCASES - good, NCASES);
        return EXIT_FAIL;
    }
    print("hostile: all %d cases behaved\n", NCASES);
    return EXIT_OK;
}
