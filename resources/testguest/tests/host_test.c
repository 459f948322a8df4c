/*
 * mirrorvm test guest: host-side unit tests of the pure C logic
 * (CRC32C, number and command-line parsing, formatting, record layout).
 * Built and run by run-host-tests.sh.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmdline.h"
#include "crc32c.h"
#include "record.h"
#include "util.h"

static int failures, checks;

#define CHECK(cond)                                                          \
    do {                                                                     \
        checks++;                                                            \
        if (!(cond)) {                                                       \
            failures++;                                                      \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
        }                                                                    \
    } while (0)

static void test_crc32c(void)
{
    static const uint8_t zeros[32];
    uint8_t ones[32];
    uint32_t a;
    CHECK(crc32c(0, "123456789", 9) == 0xE3069283u);
    CHECK(crc32c(0, "", 0) == 0);
    /* RFC 3720 B.4 test vectors */
    CHECK(crc32c(0, zeros, 32) == 0x8A9136AAu);
    memset(ones, 0xff, sizeof ones);
    CHECK(crc32c(0, ones, 32) == 0x62A8AB43u);
    a = crc32c(0, "1234", 4);
    CHECK(crc32c(a, "56789", 5) == 0xE3069283u);
}

static void test_parse_u64(void)
{
    uint64_t v;
    CHECK(parse_u64("0", 1, 0, &v) == 0 && v == 0);
    CHECK(parse_u64("12345", 5, 0, &v) == 0 && v == 12345);
    CHECK(parse_u64("0xd0000000", 10, 0, &v) == 0 && v == 0xd0000000u);
    CHECK(parse_u64("0XfF", 4, 0, &v) == 0 && v == 255);
    CHECK(parse_u64("4K", 2, 1, &v) == 0 && v == 4096);
    CHECK(parse_u64("2m", 2, 1, &v) == 0 && v == 2u << 20);
    CHECK(parse_u64("1G", 2, 1, &v) == 0 && v == 1u << 30);
    CHECK(parse_u64("4K", 2, 0, &v) == -1);
    CHECK(parse_u64("", 0, 0, &v) == -1);
    CHECK(parse_u64("0x", 2, 0, &v) == -1);
    CHECK(parse_u64("K", 1, 1, &v) == -1);
    CHECK(parse_u64("12a", 3, 0, &v) == -1);
    CHECK(parse_u64("-1", 2, 0, &v) == -1);
    CHECK(parse_u64("18446744073709551615", 20, 0, &v) == 0 && v == UINT64_MAX);
    CHECK(parse_u64("18446744073709551616", 20, 0, &v) == -1);
    CHECK(parse_u64("0x10000000000000000", 19, 0, &v) == -1);
    CHECK(parse_u64("17179869184G", 12, 1, &v) == -1);
}

static void check_fmt(const char *want, const char *fmt, ...)
{
    char got[256], ref[256];
    va_list ap, ap2;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    fmt_vsnprintf(got, sizeof got, fmt, ap);
    vsnprintf(ref, sizeof ref, fmt, ap2);
    va_end(ap2);
    va_end(ap);
    checks++;
    if (strcmp(got, want) || strcmp(ref, want)) {
        failures++;
        fprintf(stderr, "fmt \"%s\": got \"%s\", libc \"%s\", want \"%s\"\n", fmt, got,
                ref, want);
    }
}

static void test_fmt(void)
{
    char small[5];
    check_fmt("counter 42", "counter %llu", 42ull);
    check_fmt("-17|17|4294967295", "%d|%i|%u", -17, 17, 4294967295u);
    check_fmt("0x0000beef", "0x%08x", 0xbeefu);
    check_fmt("ABCDEF", "%X", 0xabcdefu);
    check_fmt("ffffffffffffffff", "%llx", (unsigned long long)-1);
    check_fmt("-9223372036854775808", "%lld", (long long)(-9223372036854775807ll - 1));
    check_fmt("[  ab][ab  ]", "[%4s][%-4s]", "ab", "ab");
    check_fmt("[abc]", "[%.*s]", 3, "abcdef");
    check_fmt("[    7][7    ][00007]", "[%5d][%-5d][%05d]", 7, 7, 7);
    check_fmt("[-0007]", "[%05d]", -7);
    check_fmt("100%", "100%%");
    check_fmt("x=c", "x=%c", 'c');
    check_fmt("size 12", "size %zu", (size_t)12);
    CHECK(fmt_snprintf(small, sizeof small, "%s", "truncated") == 4);
    CHECK(strcmp(small, "trun") == 0);
}

static void test_cmdline(void)
{
    struct cmdline cl;
    uint64_t v;
    size_t len;
    const char *s;
    static const char *const disk_keys[] = { "records", "seed", NULL };

    CHECK(cmdline_parse("hello", &cl) == 0);
    CHECK(str_eqn(cl.workload, cl.wlen, "hello") && cl.nopts == 0 && cl.ndevs == 0);

    CHECK(cmdline_parse("  disk records=100  seed=0x10 virtio_mmio.device=4K@0xd0000000:5 "
                        "virtio_mmio.device=4K@0xd0001000:6:1\n",
                        &cl) == 0);
    CHECK(str_eqn(cl.workload, cl.wlen, "disk"));
    CHECK(cl.nopts == 2 && cl.ndevs == 2);
    CHECK(cl.devs[0].base == 0xd0000000u && cl.devs[0].size == 4096 && cl.devs[0].irq == 5);
    CHECK(cl.devs[1].base == 0xd0001000u && cl.devs[1].irq == 6);
    CHECK(cmdline_check_keys(&cl, disk_keys) == 0);
    CHECK(cmdline_u64(&cl, "records", 64, 1, 1000, &v) == 0 && v == 100);
    CHECK(cmdline_u64(&cl, "seed", 1, 0, UINT64_MAX, &v) == 0 && v == 16);
    CHECK(cmdline_u64(&cl, "absent", 64, 1, 1000, &v) == 0 && v == 64);
    CHECK(cmdline_u64(&cl, "records", 64, 1, 99, &v) == -1 && strstr(cl.err, "out of range"));
    s = cmdline_str(&cl, "seed", &len);
    CHECK(s && len == 4 && !memcmp(s, "0x10", 4));

    /* the workload is the first word without '=', wherever it is */
    CHECK(cmdline_parse("console=ttyS0 counter limit=3", &cl) == 0);
    CHECK(str_eqn(cl.workload, cl.wlen, "counter") && cl.nopts == 2);

    /* other modules' parameters are ignored */
    CHECK(cmdline_parse("hello 8250.nr_uarts=1", &cl) == 0 && cl.nopts == 0);

    CHECK(cmdline_parse("disk bogus=1", &cl) == 0);
    CHECK(cmdline_check_keys(&cl, disk_keys) == -1 && strstr(cl.err, "unknown option 'bogus'"));
    CHECK(cmdline_parse("disk records=1 records=2", &cl) == 0);
    CHECK(cmdline_check_keys(&cl, disk_keys) == -1 && strstr(cl.err, "twice"));
    CHECK(cmdline_parse("disk records=12x", &cl) == 0);
    CHECK(cmdline_u64(&cl, "records", 64, 1, 1000, &v) == -1 && strstr(cl.err, "not a number"));
    CHECK(cmdline_parse("disk records=", &cl) == 0);
    CHECK(cmdline_u64(&cl, "records", 64, 1, 1000, &v) == -1);

    CHECK(cmdline_parse("", &cl) == -1 && strstr(cl.err, "no workload"));
    CHECK(cmdline_parse("a=1", &cl) == -1);
    CHECK(cmdline_parse("hello extra", &cl) == -1 && strstr(cl.err, "unexpected word"));
    CHECK(cmdline_parse("hello =1", &cl) == -1);
    CHECK(cmdline_parse("hello virtio_mmio.device=4K", &cl) == -1);
    CHECK(cmdline_parse("hello virtio_mmio.device=4K@0xd0000000", &cl) == -1);
    CHECK(cmdline_parse("hello virtio_mmio.device=0@0xd0000000:5", &cl) == -1);
    CHECK(cmdline_parse("hello virtio_mmio.device=4K@zz:5", &cl) == -1);
    CHECK(cmdline_parse("hello virtio_mmio.device=4K@0xd0000000:5:x", &cl) == -1);
}

static void test_record(void)
{
    static uint8_t buf[REC_SIZE];
    char why[128];
    uint64_t cap = 64ull << 20 >> 9; /* 64 MiB */
    uint32_t i, n = 64;
    uint64_t prev = 0;

    CHECK(REC_PAYLOAD_WORDS == 1015);
    CHECK(record_slots(cap) == 16384);
    CHECK(record_sector(0, n, cap) == 0);
    CHECK(record_sector(1, n, cap) == 256 * 8);
    CHECK(record_sector(63, n, cap) == 63 * 256 * 8);
    for (i = 1; i < n; i++) {
        uint64_t s = record_sector(i, n, cap);
        CHECK(s > prev && s % 8 == 0 && s + 8 <= cap);
        prev = s;
    }
    /* every slot used when n == slots; odd capacities; huge disks */
    CHECK(record_sector(16383, 16384, cap) == 16383 * 8);
    CHECK(record_sector(2, 3, 100) == 8 * 8); /* slots 12: floor(2*12/3)=8 */
    CHECK(record_sector(0xfffffffeu, 0xffffffffu, UINT64_MAX) ==
          8 * (0xfffffffeull * ((UINT64_MAX / 8) / 0xffffffffu) +
               0xfffffffeull * ((UINT64_MAX / 8) % 0xffffffffu) / 0xffffffffu));

    record_fill(buf, 5, n, 40960, 77);
    CHECK(!memcmp(buf, "MVMREC01", 8));
    CHECK(buf[8] == 5 && buf[12] == 64 && buf[0x10] == 0 && buf[0x11] == 0xa0 && buf[0x18] == 77);
    CHECK(crc32c(0, buf, REC_OFF_CRC) ==
          (uint32_t)(buf[0xffc] | buf[0xffd] << 8 | buf[0xffe] << 16 | (uint32_t)buf[0xfff] << 24));
    CHECK(record_check(buf, 5, n, 40960, 77, why, sizeof why) == 0);
    CHECK(record_check(buf, 6, n, 40960, 77, why, sizeof why) == -1 && strstr(why, "holds record 5"));
    CHECK(record_check(buf, 5, n, 40968, 77, why, sizeof why) == -1 && strstr(why, "sector"));
    CHECK(record_check(buf, 5, n, 40960, 78, why, sizeof why) == -1 && strstr(why, "seed"));
    buf[100] ^= 1;
    CHECK(record_check(buf, 5, n, 40960, 77, why, sizeof why) == -1 && strstr(why, "CRC32C"));
    buf[100] ^= 1;
    buf[0] = 'X';
    CHECK(record_check(buf, 5, n, 40960, 77, why, sizeof why) == -1 && strstr(why, "magic"));
    /* deterministic payload: first word of record 0 seed 0 is splitmix64(0) */
    record_fill(buf, 0, 1, 0, 0);
    CHECK((buf[0x20] | buf[0x21] << 8 | buf[0x22] << 16 | (uint32_t)buf[0x23] << 24) ==
          (uint32_t)0xe220a8397b1dcdafull);
}

int main(void)
{
    test_crc32c();
    test_parse_u64();
    test_fmt();
    test_cmdline();
    test_record();
    if (failures) {
        fprintf(stderr, "host tests: %d of %d checks FAILED\n", failures, checks);
        return 1;
    }
    printf("host tests: all %d checks passed\n", checks);
    return 0;
}
