/*
 * mirrorvm test guest: record format (see record.h).
 */
#include "record.h"
#include "crc32c.h"
#include "util.h"

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

uint64_t record_slots(uint64_t capacity)
{
    return capacity / REC_SECTORS;
}

uint64_t record_sector(uint32_t i, uint32_t n, uint64_t capacity)
{
    uint64_t slots = record_slots(capacity);
    /* floor(i * slots / n) without a 128-bit product */
    uint64_t slot = (uint64_t)i * (slots / n) + (uint64_t)i * (slots % n) / n;
    return slot * REC_SECTORS;
}

void record_fill(uint8_t *buf, uint32_t i, uint32_t n, uint64_t sector, uint64_t seed)
{
    uint64_t state = seed ^ ((uint64_t)i << 32);
    uint32_t k;
    mem_copy(buf, REC_MAGIC, 8);
    put32(buf + REC_OFF_INDEX, i);
    put32(buf + REC_OFF_COUNT, n);
    put64(buf + REC_OFF_SECTOR, sector);
    put64(buf + REC_OFF_SEED, seed);
    for (k = 0; k < REC_PAYLOAD_WORDS; k++)
        put32(buf + REC_OFF_PAYLOAD + 4 * k, (uint32_t)splitmix64(&state));
    put32(buf + REC_OFF_CRC, crc32c(0, buf, REC_OFF_CRC));
}

int record_check(const uint8_t *buf, uint32_t i, uint32_t n, uint64_t sector,
                 uint64_t seed, char *why, size_t whylen)
{
    uint64_t state = seed ^ ((uint64_t)i << 32);
    uint32_t k, crc = crc32c(0, buf, REC_OFF_CRC);

    if (!mem_eq(buf, REC_MAGIC, 8)) {
        fmt_snprintf(why, whylen, "bad magic %02x%02x%02x%02x%02x%02x%02x%02x",
                     buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7]);
        return -1;
    }
    if (crc != get32(buf + REC_OFF_CRC)) {
        fmt_snprintf(why, whylen, "CRC32C mismatch: stored 0x%08x, computed 0x%08x",
                     get32(buf + REC_OFF_CRC), crc);
        return -1;
    }
    if (get32(buf + REC_OFF_INDEX) != i || get32(buf + REC_OFF_COUNT) != n) {
        fmt_snprintf(why, whylen, "holds record %u of %u, expected %u of %u",
                     get32(buf + REC_OFF_INDEX), get32(buf + REC_OFF_COUNT), i, n);
        return -1;
    }
    if (get64(buf + REC_OFF_SECTOR) != sector) {
        fmt_snprintf(why, whylen, "says sector %llu, read from sector %llu",
                     (unsigned long long)get64(buf + REC_OFF_SECTOR),
                     (unsigned long long)sector);
        return -1;
    }
    if (get64(buf + REC_OFF_SEED) != seed) {
        fmt_snprintf(why, whylen, "written with seed %llu, expected %llu",
                     (unsigned long long)get64(buf + REC_OFF_SEED),
                     (unsigned long long)seed);
        return -1;
    }
    for (k = 0; k < REC_PAYLOAD_WORDS; k++) {
        uint32_t want = (uint32_t)splitmix64(&state);
        if (get32(buf + REC_OFF_PAYLOAD + 4 * k) != want) {
            fmt_snprintf(why, whylen, "payload word %u is 0x%08x, expected 0x%08x", k,
                         get32(buf + REC_OFF_PAYLOAD + 4 * k), want);
            return -1;
        }
    }
    return 0;
}
