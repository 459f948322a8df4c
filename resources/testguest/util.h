/*
 * mirrorvm test guest: freestanding helpers with no machine dependency
 * (also compiled for the host by tests/run-host-tests.sh).
 */
#ifndef TESTGUEST_UTIL_H
#define TESTGUEST_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

size_t str_len(const char *s);
int str_eq(const char *a, const char *b);
/* a[0..alen) equals the NUL-terminated b */
int str_eqn(const char *a, size_t alen, const char *b);
int mem_eq(const void *a, const void *b, size_t n);
void mem_copy(void *dst, const void *src, size_t n);
void mem_fill(void *dst, int c, size_t n);

/*
 * Parse an unsigned number from s[0..len): decimal, or hex with 0x.  With
 * allow_suffix, K/M/G (binary multiples, as Linux's memparse) may follow.
 * Returns 0 on success, -1 on syntax error or overflow.
 */
int parse_u64(const char *s, size_t len, int allow_suffix, uint64_t *out);

/* A small vsnprintf: %% %c %s %.*s %d %i %u %x %X %p with '0' and '-'
 * flags, a width, and the l/ll/z length modifiers.  Always NUL-terminates
 * (if size > 0); returns the number of characters stored. */
size_t fmt_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
size_t fmt_snprintf(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
