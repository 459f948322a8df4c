/*
 * mirrorvm test guest: the disk workload's record format (pure,
 * host-testable).  README.md documents it for host-side verifiers.
 *
 * A record is 4096 bytes (8 sectors of 512 bytes), little endian:
 *   0x000  8   magic "MVMREC01"
 *   0x008  4   record index i (0 .. count-1)
 *   0x00c  4   record count N
 *   0x010  8   sector: the record's first 512-byte sector on the disk
 *   0x018  8   seed
 *   0x020  4060 payload: 1015 u32 words, word k = low 32 bits of the
 *              (k+1)-th output of splitmix64 started from
 *              state = seed ^ ((u64)i << 32)
 *   0xffc  4   CRC32C of bytes 0x000..0xffb
 * Record i lives at sector record_sector(i, N, capacity).
 */
#ifndef TESTGUEST_RECORD_H
#define TESTGUEST_RECORD_H

#include <stddef.h>
#include <stdint.h>

#define REC_SIZE        4096
#define REC_SECTORS     8
#define REC_MAGIC       "MVMREC01"
#define REC_OFF_INDEX   0x008
#define REC_OFF_COUNT   0x00c
#define REC_OFF_SECTOR  0x010
#define REC_OFF_SEED    0x018
#define REC_OFF_PAYLOAD 0x020
#define REC_OFF_CRC     0xffc
#define REC_PAYLOAD_WORDS ((REC_OFF_CRC - REC_OFF_PAYLOAD) / 4)

/* Number of 8-sector slots on a disk of capacity sectors: the most records. */
uint64_t record_slots(uint64_t capacity);

/*
 * First sector of record i of n (n <= record_slots(capacity)):
 * 8 * floor(i * slots / n), spreading the records across the whole disk.
 */
uint64_t record_sector(uint32_t i, uint32_t n, uint64_t capacity);

void record_fill(uint8_t *buf, uint32_t i, uint32_t n, uint64_t sector, uint64_t seed);

/*
 * Check buf against record i of n at sector with seed.  Returns 0 if it
 * matches exactly, else -1 with a reason in why.
 */
int record_check(const uint8_t *buf, uint32_t i, uint32_t n, uint64_t sector,
                 uint64_t seed, char *why, size_t whylen);

#endif
