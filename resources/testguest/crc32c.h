/*
 * mirrorvm test guest: CRC32C (Castagnoli), software, table driven.
 */
#ifndef TESTGUEST_CRC32C_H
#define TESTGUEST_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/*
 * Standard CRC-32C: reflected polynomial 0x82F63B78, initial value and final
 * xor 0xFFFFFFFF.  Chainable: crc32c(crc32c(0, a, n), b, m) is the CRC of a
 * followed by b.  crc32c(0, "123456789", 9) == 0xE3069283.
 */
uint32_t crc32c(uint32_t crc, const void *data, size_t len);

#endif
