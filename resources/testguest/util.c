/*
 * mirrorvm test guest: freestanding helpers (see util.h).
 */
#include "util.h"

size_t str_len(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int str_eq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

int str_eqn(const char *a, size_t alen, const char *b)
{
    size_t i;
    for (i = 0; i < alen; i++)
        if (b[i] == 0 || a[i] != b[i])
            return 0;
    return b[alen] == 0;
}

int mem_eq(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    size_t i;
    for (i = 0; i < n; i++)
        if (x[i] != y[i])
            return 0;
    return 1;
}

void mem_copy(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
}

void mem_fill(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
}

int parse_u64(const char *s, size_t len, int allow_suffix, uint64_t *out)
{
    uint64_t v = 0, base = 10, mult = 1;
    size_t i = 0, digits = 0;

    if (len >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        i = 2;
    }
    if (allow_suffix && len > i) {
        switch (s[len - 1]) {
        case 'k': case 'K': mult = 1ull << 10; len--; break;
        case 'm': case 'M': mult = 1ull << 20; len--; break;
        case 'g': case 'G': mult = 1ull << 30; len--; break;
        default: break;
        }
    }
    for (; i < len; i++) {
        char c = s[i];
        uint64_t d;
        if (c >= '0' && c <= '9')
            d = (uint64_t)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = (uint64_t)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = (uint64_t)(c - 'A' + 10);
        else
            return -1;
        if (v > (UINT64_MAX - d) / base)
            return -1;
        v = v * base + d;
        digits++;
    }
    if (digits == 0)
        return -1;
    if (v > UINT64_MAX / mult)
        return -1;
    *out = v * mult;
    return 0;
}

struct sink {
    char *buf;
    size_t size, pos;
};

static void put(struct sink *s, char c)
{
    if (s->pos + 1 < s->size)
        s->buf[s->pos++] = c;
}

static void put_padded(struct sink *s, const char *str, size_t len, int width,
                       int left, char pad)
{
    size_t w = width > 0 ? (size_t)width : 0;
    size_t i;
    if (!left && pad == '0' && len > 0 && str[0] == '-') {
        put(s, '-');
        str++;
        len--;
        if (w > 0)
            w--;
    }
    if (!left)
        for (i = len; i < w; i++)
            put(s, pad);
    for (i = 0; i < len; i++)
        put(s, str[i]);
    if (left)
        for (i = len; i < w; i++)
            put(s, ' ');
}

size_t fmt_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct sink s = { buf, size, 0 };
    char tmp[24];

    for (; *fmt; fmt++) {
        int left = 0, width = 0, prec = -1, lng = 0;
        char pad = ' ';
        if (*fmt != '%') {
            put(&s, *fmt);
            continue;
        }
        fmt++;
        for (;; fmt++) {
            if (*fmt == '-')
                left = 1;
            else if (*fmt == '0')
                pad = '0';
            else
                break;
        }
        if (*fmt == '*') {
            width = va_arg(ap, int);
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
        }
        if (*fmt == '.') {
            fmt++;
            prec = 0;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    prec = prec * 10 + (*fmt++ - '0');
            }
        }
        while (*fmt == 'l' || *fmt == 'z') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case '%':
            put(&s, '%');
            break;
        case 'c':
            tmp[0] = (char)va_arg(ap, int);
            put_padded(&s, tmp, 1, width, left, ' ');
            break;
        case 's': {
            const char *str = va_arg(ap, const char *);
            size_t len = 0;
            if (!str)
                str = "(null)";
            while ((prec < 0 || len < (size_t)prec) && str[len])
                len++;
            put_padded(&s, str, len, width, left, ' ');
            break;
        }
        case 'd':
        case 'i':
        case 'u':
        case 'x':
        case 'X':
        case 'p': {
            uint64_t v;
            int neg = 0, n = 0;
            unsigned base = (*fmt == 'x' || *fmt == 'X' || *fmt == 'p') ? 16 : 10;
            const char *digits = *fmt == 'X' ? "0123456789ABCDEF" : "0123456789abcdef";
            char out[24];
            int o = 0;
            if (*fmt == 'p') {
                v = (uint64_t)(uintptr_t)va_arg(ap, void *);
                out[o++] = '0';
                out[o++] = 'x';
            } else if (*fmt == 'd' || *fmt == 'i') {
                int64_t sv = lng ? va_arg(ap, long long) : va_arg(ap, int);
                if (sv < 0) {
                    neg = 1;
                    v = (uint64_t)0 - (uint64_t)sv;
                } else {
                    v = (uint64_t)sv;
                }
            } else {
                v = lng ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned);
            }
            do {
                tmp[n++] = digits[v % base];
                v /= base;
            } while (v);
            if (neg)
                out[o++] = '-';
            while (n)
                out[o++] = tmp[--n];
            put_padded(&s, out, (size_t)o, width, left, left ? ' ' : pad);
            break;
        }
        default:
            put(&s, '%');
            if (*fmt)
                put(&s, *fmt);
            else
                fmt--;
            break;
        }
    }
    if (size > 0)
        buf[s.pos] = 0;
    return s.pos;
}

size_t fmt_snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    size_t n;
    va_start(ap, fmt);
    n = fmt_vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}
