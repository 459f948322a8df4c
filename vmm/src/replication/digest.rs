//! Disk digests: a BLAKE3 hash of every chunk of a disk image, so that a host that
//! comes back (failback) is sent only the chunks that differ from the primary's.
//!
//! The chunk size depends only on the disk's size ([`digest_chunk`]), so both hosts
//! cut the disk the same way. BLAKE3, not a CRC: the guest chooses what its disk
//! holds, and must not be able to make two different chunks look alike.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::protocol::{digest_chunk, Digest, DIGEST_LEN};

/// The hash of one chunk.
pub fn hash(data: &[u8]) -> [u8; DIGEST_LEN] {
    *blake3::hash(data).as_bytes()
}

/// Reads the `size` bytes of `file` chunk by chunk and hashes each.
pub fn of_file(file: &File, size: u64) -> std::io::Result<Digest> {
    let chunk = digest_chunk(size);
    let count = size.div_ceil(chunk);
    let mut hashes = Vec::with_capacity(crate::arch::to_usize(count));
    let mut buf = vec![0u8; crate::arch::to_usize(chunk)];
    let mut offset = 0;
    while offset < size {
        let n = crate::arch::to_usize((size - offset).min(chunk));
        file.read_exact_at(&mut buf[..n], offset)?;
        hashes.push(hash(&buf[..n]));
        offset += n as u64;
    }
    Ok(Digest { chunk, hashes })
}

/// Whether `digest` has the shape a disk of `size` bytes must have: the agreed chunk
/// size and one hash per chunk. A peer's digest of another shape is refused.
pub fn fits(digest: &Digest, size: u64) -> bool {
    let chunk = digest_chunk(size);
    digest.chunk == chunk && digest.hashes.len() as u64 == size.div_ceil(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn equal_chunks_hash_alike_and_one_changed_byte_shows() {
        let size: u64 = 3 * (64 << 10) + 512;
        let mut a = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..size).map(|i| u8::try_from(i % 251).unwrap()).collect();
        a.write_all(&data).unwrap();
        let mut b = tempfile::tempfile().unwrap();
        let mut changed = data.clone();
        changed[2 * (64 << 10) + 100] ^= 1;
        b.write_all(&changed).unwrap();
        let da = of_file(&a, size).unwrap();
        let db = of_file(&b, size).unwrap();
        assert!(fits(&da, size));
        assert_eq!(da.hashes.len(), 4, "the short last chunk is a chunk too");
        let differ: Vec<usize> = (0..4).filter(|&i| da.hashes[i] != db.hashes[i]).collect();
        assert_eq!(differ, vec![2]);
        // Another shape is refused.
        let mut short = da.clone();
        short.hashes.pop();
        assert!(!fits(&short, size));
        assert!(!fits(&da, 2 * size));
    }

    #[test]
    fn large_disks_get_larger_chunks_within_the_bound() {
        use super::super::protocol::{MAX_DIGEST_CHUNKS, MIN_DIGEST_CHUNK};
        assert_eq!(digest_chunk(256 << 20), MIN_DIGEST_CHUNK);
        for size in [16u64 << 30, 1 << 40, (1 << 40) + 1, 3 << 41] {
            let c = digest_chunk(size);
            assert!(size.div_ceil(c) <= MAX_DIGEST_CHUNKS, "{size}: {c}");
            assert!(
                size.div_ceil(c / 2) > MAX_DIGEST_CHUNKS,
                "{size}: {c} is not the least"
            );
        }
    }
}
