/*
 * mirrorvm test guest: command-line parsing (pure, host-testable).
 *
 *   WORKLOAD [key=value ...] [virtio_mmio.device=SIZE@BASE:IRQ[:ID] ...]
 *
 * The workload is the first word without '='.  Other words are key=value
 * options; virtio_mmio.device entries (Linux's syntax) describe the
 * virtio-mmio devices; words whose key contains a '.' are parameters for
 * someone else (as in Linux) and are ignored.
 */
#ifndef TESTGUEST_CMDLINE_H
#define TESTGUEST_CMDLINE_H

#include <stddef.h>
#include <stdint.h>

#define CMDLINE_MAX_OPTS 32
#define CMDLINE_MAX_DEVS 8

struct cmd_opt {
    const char *key;
    size_t klen;
    const char *val;
    size_t vlen;
};

struct mmio_dev {
    uint64_t base;
    uint64_t size;
    uint32_t irq;
};

struct cmdline {
    const char *workload;      /* NULL if none */
    size_t wlen;
    int nopts;
    struct cmd_opt opts[CMDLINE_MAX_OPTS];
    int ndevs;
    struct mmio_dev devs[CMDLINE_MAX_DEVS];
    char err[160];
};

/* Parse s (NUL-terminated).  Returns 0, or -1 with cl->err set. */
int cmdline_parse(const char *s, struct cmdline *cl);

/*
 * Options of a workload: every option key must be in allowed (a NULL
 * terminated list).  Returns 0, or -1 with cl->err set.
 */
int cmdline_check_keys(struct cmdline *cl, const char *const *allowed);

/*
 * The numeric option key (decimal or 0x hex), def if absent.  Range-checked
 * against [min, max].  Returns 0, or -1 with cl->err set.
 */
int cmdline_u64(struct cmdline *cl, const char *key, uint64_t def,
                uint64_t min, uint64_t max, uint64_t *out);

/* The string option key, or NULL (len in *len). */
const char *cmdline_str(const struct cmdline *cl, const char *key, size_t *len);

/* Parse one "SIZE@BASE:IRQ[:ID]" value.  Returns 0 or -1. */
int parse_mmio_dev(const char *s, size_t len, struct mmio_dev *dev);

#endif
