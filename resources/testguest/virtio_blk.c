/*
 * mirrorvm test guest: polling virtio-blk driver (see virtio_blk.h).
 */
#include "virtio_blk.h"
#include "guest.h"

/* Ring memory: descriptor table, avail ring, used ring, a page each. */
static uint8_t ring_pages[3][4096] __attribute__((aligned(4096)));
/* Request header and status byte of vblk_request */
static struct blk_req_hdr req_hdr __attribute__((aligned(64)));
static volatile uint8_t req_status __attribute__((aligned(64)));

#define VB_RESET_TIMEOUT_MS 1000
/* A request may wait while the VMM defers it (a full checkpoint region waits
 * for the peer), so be generous; it is vCPU running time (see struct timeout). */
#define VB_REQUEST_TIMEOUT_MS 30000
#define VB_STATUS_POLL_MS   2      /* read Status (an MMIO exit) this often */

uint32_t vb_read32(const struct vblk *d, uint32_t off)
{
    return *(volatile uint32_t *)(d->base + off);
}

void vb_write32(const struct vblk *d, uint32_t off, uint32_t v)
{
    *(volatile uint32_t *)(d->base + off) = v;
}

static void barrier(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

const char *vb_outcome_name(enum vb_outcome o)
{
    switch (o) {
    case VB_DONE: return "completed";
    case VB_NEEDS_RESET: return "DEVICE_NEEDS_RESET";
    case VB_TIMEOUT: return "timed out";
    case VB_BAD_USED: return "completed with a wrong descriptor id";
    }
    return "?";
}

const char *vb_status_name(uint8_t status)
{
    switch (status) {
    case VIRTIO_BLK_S_OK: return "OK";
    case VIRTIO_BLK_S_IOERR: return "IOERR";
    case VIRTIO_BLK_S_UNSUPP: return "UNSUPP";
    case 0xff: return "none";
    }
    return "invalid";
}

int vblk_probe(struct vblk *d, uintptr_t base)
{
    uint32_t magic, version, id;
    d->base = base;
    magic = vb_read32(d, VMMIO_MAGIC);
    if (magic != VIRTIO_MAGIC) {
        fmt_snprintf(d->err, sizeof d->err, "no virtio-mmio magic at 0x%llx (read 0x%08x)",
                     (unsigned long long)base, magic);
        return -1;
    }
    version = vb_read32(d, VMMIO_VERSION);
    if (version != 2) {
        fmt_snprintf(d->err, sizeof d->err,
                     "virtio-mmio at 0x%llx has version %u; only 2 (modern) is supported",
                     (unsigned long long)base, version);
        return -1;
    }
    id = vb_read32(d, VMMIO_DEVICE_ID);
    if (id != VIRTIO_ID_BLOCK) {
        fmt_snprintf(d->err, sizeof d->err, "virtio-mmio at 0x%llx is device %u, not block (2)",
                     (unsigned long long)base, id);
        return -1;
    }
    return 0;
}

int vblk_reset(struct vblk *d)
{
    struct timeout t;
    timeout_start(&t, VB_RESET_TIMEOUT_MS);
    vb_write32(d, VMMIO_STATUS, 0);
    while (vb_read32(d, VMMIO_STATUS) != 0) {
        if (timeout_expired(&t)) {
            fmt_snprintf(d->err, sizeof d->err, "device did not reset (status 0x%x)",
                         vb_read32(d, VMMIO_STATUS));
            return -1;
        }
        delay_us(100);
    }
    return 0;
}

static void set_status(struct vblk *d, uint32_t bits)
{
    vb_write32(d, VMMIO_STATUS, vb_read32(d, VMMIO_STATUS) | bits);
}

static void write64(struct vblk *d, uint32_t lo, uint64_t v)
{
    vb_write32(d, lo, (uint32_t)v);
    vb_write32(d, lo + 4, (uint32_t)(v >> 32));
}

int vblk_init(struct vblk *d)
{
    uint64_t want;
    uint32_t st, gen, lo, hi;
    uint16_t q;

    if (vblk_reset(d))
        return -1;
    set_status(d, VS_ACKNOWLEDGE);
    set_status(d, VS_DRIVER);

    vb_write32(d, VMMIO_DEVICE_FEATURES_SEL, 0);
    lo = vb_read32(d, VMMIO_DEVICE_FEATURES);
    vb_write32(d, VMMIO_DEVICE_FEATURES_SEL, 1);
    hi = vb_read32(d, VMMIO_DEVICE_FEATURES);
    d->dev_features = (uint64_t)hi << 32 | lo;
    if (!(d->dev_features & (1ull << VIRTIO_F_VERSION_1))) {
        fmt_snprintf(d->err, sizeof d->err, "device does not offer VIRTIO_F_VERSION_1 "
                     "(features 0x%llx)", (unsigned long long)d->dev_features);
        set_status(d, VS_FAILED);
        return -1;
    }
    want = (1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_BLK_F_FLUSH) | (1ull << VIRTIO_BLK_F_RO);
    d->features = d->dev_features & want;
    vb_write32(d, VMMIO_DRIVER_FEATURES_SEL, 0);
    vb_write32(d, VMMIO_DRIVER_FEATURES, (uint32_t)d->features);
    vb_write32(d, VMMIO_DRIVER_FEATURES_SEL, 1);
    vb_write32(d, VMMIO_DRIVER_FEATURES, (uint32_t)(d->features >> 32));
    set_status(d, VS_FEATURES_OK);
    st = vb_read32(d, VMMIO_STATUS);
    if (!(st & VS_FEATURES_OK)) {
        fmt_snprintf(d->err, sizeof d->err, "device refused features 0x%llx (status 0x%x)",
                     (unsigned long long)d->features, st);
        set_status(d, VS_FAILED);
        return -1;
    }

    vb_write32(d, VMMIO_QUEUE_SEL, 0);
    if (vb_read32(d, VMMIO_QUEUE_READY) != 0) {
        fmt_snprintf(d->err, sizeof d->err, "queue 0 is ready right after reset");
        set_status(d, VS_FAILED);
        return -1;
    }
    d->qmax = (uint16_t)vb_read32(d, VMMIO_QUEUE_NUM_MAX);
    if (d->qmax == 0) {
        fmt_snprintf(d->err, sizeof d->err, "queue 0 does not exist (QueueNumMax 0)");
        set_status(d, VS_FAILED);
        return -1;
    }
    for (q = VQ_SIZE_WANT; q > d->qmax; q >>= 1)
        ;
    d->qsize = q;
    mem_fill(ring_pages, 0, sizeof ring_pages);
    d->desc = (volatile struct virtq_desc *)ring_pages[0];
    d->avail = (volatile struct virtq_avail *)ring_pages[1];
    d->used = (volatile struct virtq_used *)ring_pages[2];
    d->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
    d->avail_idx = 0;
    d->used_idx = 0;
    vb_write32(d, VMMIO_QUEUE_NUM, q);
    write64(d, VMMIO_QUEUE_DESC_LOW, d->desc_addr ? d->desc_addr : (uintptr_t)ring_pages[0]);
    write64(d, VMMIO_QUEUE_DRIVER_LOW, d->driver_addr ? d->driver_addr : (uintptr_t)ring_pages[1]);
    write64(d, VMMIO_QUEUE_DEVICE_LOW, d->device_addr ? d->device_addr : (uintptr_t)ring_pages[2]);
    vb_write32(d, VMMIO_QUEUE_READY, 1);

    do {
        gen = vb_read32(d, VMMIO_CONFIG_GENERATION);
        lo = vb_read32(d, VMMIO_CONFIG + 0);
        hi = vb_read32(d, VMMIO_CONFIG + 4);
    } while (gen != vb_read32(d, VMMIO_CONFIG_GENERATION));
    d->capacity = (uint64_t)hi << 32 | lo;

    set_status(d, VS_DRIVER_OK);
    st = vb_read32(d, VMMIO_STATUS);
    if (st & (VS_NEEDS_RESET | VS_FAILED)) {
        fmt_snprintf(d->err, sizeof d->err, "device status 0x%x after DRIVER_OK", st);
        return -1;
    }
    return 0;
}

enum vb_outcome vblk_submit(struct vblk *d, uint16_t head, uint64_t timeout_ms,
                            uint32_t *used_len)
{
    struct timeout t, poll;
    volatile struct virtq_used_elem *e;

    d->avail->ring[d->avail_idx % d->qsize] = head;
    barrier();
    d->avail_idx = (uint16_t)(d->avail_idx + 1 + d->avail_extra);
    d->avail_extra = 0;
    d->avail->idx = d->avail_idx;
    barrier();
    vb_write32(d, VMMIO_QUEUE_NOTIFY, 0);

    timeout_start(&t, timeout_ms);
    timeout_start(&poll, VB_STATUS_POLL_MS);
    while (d->used->idx == d->used_idx) {
        cpu_relax();
        if (timeout_expired(&poll)) {
            if (vb_read32(d, VMMIO_STATUS) & VS_NEEDS_RESET)
                return VB_NEEDS_RESET;
            timeout_start(&poll, VB_STATUS_POLL_MS);
        }
        if (timeout_expired(&t)) {
            if (d->used->idx != d->used_idx)
                break;
            if (vb_read32(d, VMMIO_STATUS) & VS_NEEDS_RESET)
                return VB_NEEDS_RESET;
            return VB_TIMEOUT;
        }
    }
    barrier();
    e = &d->used->ring[d->used_idx % d->qsize];
    d->used_idx++;
    if (used_len)
        *used_len = e->len;
    return e->id == head ? VB_DONE : VB_BAD_USED;
}

enum vb_outcome vblk_request(struct vblk *d, uint32_t type, uint64_t sector, void *data,
                             uint32_t len, int device_writes, int split, uint8_t *status)
{
    uint16_t n = 0;
    uint32_t used_len;
    enum vb_outcome o;
    uint16_t dflags = device_writes ? VRING_DESC_F_WRITE : 0;

    req_hdr.type = type;
    req_hdr.reserved = 0;
    req_hdr.sector = sector;
    req_status = 0xff;

    d->desc[n].addr = (uintptr_t)&req_hdr;
    d->desc[n].len = sizeof req_hdr;
    d->desc[n].flags = VRING_DESC_F_NEXT;
    d->desc[n].next = (uint16_t)(n + 1);
    n++;
    if (len) {
        uint32_t first = (split && len > 512) ? 512 : len;
        d->desc[n].addr = (uintptr_t)data;
        d->desc[n].len = first;
        d->desc[n].flags = dflags | VRING_DESC_F_NEXT;
        d->desc[n].next = (uint16_t)(n + 1);
        n++;
        if (first < len) {
            d->desc[n].addr = (uintptr_t)data + first;
            d->desc[n].len = len - first;
            d->desc[n].flags = dflags | VRING_DESC_F_NEXT;
            d->desc[n].next = (uint16_t)(n + 1);
            n++;
        }
    }
    d->desc[n].addr = (uintptr_t)&req_status;
    d->desc[n].len = 1;
    d->desc[n].flags = VRING_DESC_F_WRITE;
    d->desc[n].next = 0;

    o = vblk_submit(d, 0, VB_REQUEST_TIMEOUT_MS, &used_len);
    *status = req_status;
    return o;
}
