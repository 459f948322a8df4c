/*
 * mirrorvm test guest: command-line parsing (see cmdline.h).
 */
#include "cmdline.h"
#include "util.h"

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static size_t find(const char *s, size_t len, char c)
{
    size_t i;
    for (i = 0; i < len; i++)
        if (s[i] == c)
            return i;
    return len;
}

int parse_mmio_dev(const char *s, size_t len, struct mmio_dev *dev)
{
    size_t at = find(s, len, '@');
    size_t colon, rest;
    uint64_t size, base, irq;

    if (at == len)
        return -1;
    colon = at + 1 + find(s + at + 1, len - at - 1, ':');
    if (colon == len)
        return -1;
    rest = colon + 1 + find(s + colon + 1, len - colon - 1, ':');
    if (parse_u64(s, at, 1, &size) || size == 0)
        return -1;
    if (parse_u64(s + at + 1, colon - at - 1, 0, &base))
        return -1;
    if (parse_u64(s + colon + 1, rest - colon - 1, 0, &irq) || irq > 0xffffffffu)
        return -1;
    if (rest < len) {
        uint64_t id;
        if (parse_u64(s + rest + 1, len - rest - 1, 0, &id))
            return -1;
    }
    if (base + size < base)
        return -1;
    dev->base = base;
    dev->size = size;
    dev->irq = (uint32_t)irq;
    return 0;
}

int cmdline_parse(const char *s, struct cmdline *cl)
{
    static const char dev_key[] = "virtio_mmio.device";

    cl->workload = NULL;
    cl->wlen = 0;
    cl->nopts = 0;
    cl->ndevs = 0;
    cl->err[0] = 0;

    for (;;) {
        const char *w;
        size_t len, eq;
        while (is_space(*s))
            s++;
        if (!*s)
            break;
        w = s;
        while (*s && !is_space(*s))
            s++;
        len = (size_t)(s - w);
        eq = find(w, len, '=');
        if (eq == len) {
            if (!cl->workload) {
                cl->workload = w;
                cl->wlen = len;
                continue;
            }
            fmt_snprintf(cl->err, sizeof cl->err,
                         "unexpected word '%.*s' (options are key=value)",
                         (int)len, w);
            return -1;
        }
        if (eq == 0) {
            fmt_snprintf(cl->err, sizeof cl->err, "option '%.*s' has no key",
                         (int)len, w);
            return -1;
        }
        if (str_eqn(w, eq, dev_key)) {
            if (cl->ndevs == CMDLINE_MAX_DEVS) {
                fmt_snprintf(cl->err, sizeof cl->err,
                             "more than %d virtio_mmio.device entries",
                             CMDLINE_MAX_DEVS);
                return -1;
            }
            if (parse_mmio_dev(w + eq + 1, len - eq - 1, &cl->devs[cl->ndevs])) {
                fmt_snprintf(cl->err, sizeof cl->err,
                             "bad virtio_mmio.device '%.*s' (want SIZE@BASE:IRQ)",
                             (int)(len - eq - 1), w + eq + 1);
                return -1;
            }
            cl->ndevs++;
            continue;
        }
        if (find(w, eq, '.') < eq)
            continue; /* another module's parameter */
        if (cl->nopts == CMDLINE_MAX_OPTS) {
            fmt_snprintf(cl->err, sizeof cl->err, "more than %d options",
                         CMDLINE_MAX_OPTS);
            return -1;
        }
        cl->opts[cl->nopts].key = w;
        cl->opts[cl->nopts].klen = eq;
        cl->opts[cl->nopts].val = w + eq + 1;
        cl->opts[cl->nopts].vlen = len - eq - 1;
        cl->nopts++;
    }
    if (!cl->workload) {
        fmt_snprintf(cl->err, sizeof cl->err, "no workload named");
        return -1;
    }
    return 0;
}

int cmdline_check_keys(struct cmdline *cl, const char *const *allowed)
{
    int i, j, k;
    for (i = 0; i < cl->nopts; i++) {
        const struct cmd_opt *o = &cl->opts[i];
        int ok = 0;
        for (j = 0; allowed[j]; j++)
            if (str_eqn(o->key, o->klen, allowed[j]))
                ok = 1;
        if (!ok) {
            fmt_snprintf(cl->err, sizeof cl->err,
                         "unknown option '%.*s' for workload '%.*s'",
                         (int)o->klen, o->key, (int)cl->wlen, cl->workload);
            return -1;
        }
        for (k = 0; k < i; k++)
            if (cl->opts[k].klen == o->klen && mem_eq(cl->opts[k].key, o->key, o->klen)) {
                fmt_snprintf(cl->err, sizeof cl->err, "option '%.*s' given twice",
                             (int)o->klen, o->key);
                return -1;
            }
    }
    return 0;
}

const char *cmdline_str(const struct cmdline *cl, const char *key, size_t *len)
{
    int i;
    for (i = 0; i < cl->nopts; i++)
        if (str_eqn(cl->opts[i].key, cl->opts[i].klen, key)) {
            *len = cl->opts[i].vlen;
            return cl->opts[i].val;
        }
    return NULL;
}

int cmdline_u64(struct cmdline *cl, const char *key, uint64_t def,
                uint64_t min, uint64_t max, uint64_t *out)
{
    size_t len;
    const char *v = cmdline_str(cl, key, &len);
    uint64_t x;
    if (!v) {
        *out = def;
        return 0;
    }
    if (parse_u64(v, len, 0, &x)) {
        fmt_snprintf(cl->err, sizeof cl->err, "option %s: '%.*s' is not a number",
                     key, (int)len, v);
        return -1;
    }
    if (x < min || x > max) {
        fmt_snprintf(cl->err, sizeof cl->err,
                     "option %s=%llu out of range [%llu, %llu]", key,
                     (unsigned long long)x, (unsigned long long)min,
                     (unsigned long long)max);
        return -1;
    }
    *out = x;
    return 0;
}
