/*
 * mirrorvm test guest: a polling virtio-blk driver for modern (1.x)
 * virtio-mmio, run at CPL3.  One request in flight at a time; completion is
 * found by polling the used ring (interrupts are suppressed and the IOAPIC
 * pins stay masked).
 */
#ifndef TESTGUEST_VIRTIO_BLK_H
#define TESTGUEST_VIRTIO_BLK_H

#include <stdint.h>

/* virtio-mmio registers */
#define VMMIO_MAGIC            0x000
#define VMMIO_VERSION          0x004
#define VMMIO_DEVICE_ID        0x008
#define VMMIO_VENDOR_ID        0x00c
#define VMMIO_DEVICE_FEATURES  0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES  0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL        0x030
#define VMMIO_QUEUE_NUM_MAX    0x034
#define VMMIO_QUEUE_NUM        0x038
#define VMMIO_QUEUE_READY      0x044
#define VMMIO_QUEUE_NOTIFY     0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK    0x064
#define VMMIO_STATUS           0x070
#define VMMIO_QUEUE_DESC_LOW   0x080
#define VMMIO_QUEUE_DESC_HIGH  0x084
#define VMMIO_QUEUE_DRIVER_LOW 0x090
#define VMMIO_QUEUE_DRIVER_HIGH 0x094
#define VMMIO_QUEUE_DEVICE_LOW 0x0a0
#define VMMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VMMIO_CONFIG_GENERATION 0x0fc
#define VMMIO_CONFIG           0x100

#define VIRTIO_MAGIC           0x74726976u /* "virt" */
#define VIRTIO_ID_BLOCK        2

/* device status bits */
#define VS_ACKNOWLEDGE         1
#define VS_DRIVER              2
#define VS_DRIVER_OK           4
#define VS_FEATURES_OK         8
#define VS_NEEDS_RESET         0x40
#define VS_FAILED              0x80

/* feature bits */
#define VIRTIO_BLK_F_RO        5
#define VIRTIO_BLK_F_FLUSH     9
#define VIRTIO_F_VERSION_1     32

/* descriptor flags */
#define VRING_DESC_F_NEXT      1
#define VRING_DESC_F_WRITE     2
#define VRING_AVAIL_F_NO_INTERRUPT 1

/* request types and status */
#define VIRTIO_BLK_T_IN        0
#define VIRTIO_BLK_T_OUT       1
#define VIRTIO_BLK_T_FLUSH     4
#define VIRTIO_BLK_T_GET_ID    8
#define VIRTIO_BLK_S_OK        0
#define VIRTIO_BLK_S_IOERR     1
#define VIRTIO_BLK_S_UNSUPP    2
#define VIRTIO_BLK_ID_BYTES    20

#define VQ_SIZE_WANT           16  /* queue size we ask for (power of two) */
#define VQ_TABLE_ENTRIES       256 /* descriptors the table page has room for */

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[];
};

struct blk_req_hdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct vblk {
    uintptr_t base;
    uint64_t dev_features;      /* offered */
    uint64_t features;          /* accepted */
    uint16_t qsize;
    uint16_t qmax;
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    uint16_t avail_idx;
    uint16_t used_idx;
    uint16_t avail_extra;       /* hostile: advance avail idx this much more, once */
    uint64_t capacity;          /* 512-byte sectors */
    /* ring addresses given to the device (normally the buffers above) */
    uint64_t desc_addr, driver_addr, device_addr;
    char err[160];
};

/* Outcome of one submitted chain */
enum vb_outcome {
    VB_DONE = 0,        /* completed; *used_len set */
    VB_NEEDS_RESET,     /* the device set DEVICE_NEEDS_RESET */
    VB_TIMEOUT,         /* neither within the timeout */
    VB_BAD_USED,        /* completed with an id that is not our head */
};

uint32_t vb_read32(const struct vblk *d, uint32_t off);
void vb_write32(const struct vblk *d, uint32_t off, uint32_t v);

/* magic, version 2 and device id 2 at base?  0, or -1 with d->err. */
int vblk_probe(struct vblk *d, uintptr_t base);

/*
 * Reset and initialise the device at d->base (probe first).  Uses the ring
 * addresses in d->desc_addr etc. if nonzero (hostile tests), else the
 * driver's own.  0, or -1 with d->err.
 */
int vblk_init(struct vblk *d);

/* Write 0 to Status and wait until it reads 0.  0, or -1 on timeout. */
int vblk_reset(struct vblk *d);

/* Put head on the avail ring, notify, and wait up to timeout_ms. */
enum vb_outcome vblk_submit(struct vblk *d, uint16_t head, uint64_t timeout_ms,
                            uint32_t *used_len);

/*
 * A whole request: header, optional data (split across two descriptors
 * when split is set and len > 512), status.  device_writes: the data is
 * written by the device (IN, GET_ID).  Returns the outcome; *status gets
 * the status byte (0xff if the device wrote none).
 */
enum vb_outcome vblk_request(struct vblk *d, uint32_t type, uint64_t sector, void *data,
                             uint32_t len, int device_writes, int split, uint8_t *status);

const char *vb_outcome_name(enum vb_outcome o);
const char *vb_status_name(uint8_t status);

#endif
