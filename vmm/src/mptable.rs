//! The Intel MultiProcessor Specification 1.4 table that tells a guest how many
//! vCPUs it has and where its IOAPIC is. Linux finds it by scanning the last KiB of
//! base memory (we put it at [`EBDA_START`]); our test guest does the same.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START, MAX_GSI};
use crate::memory::GuestMemory;

pub use crate::layout::MAX_VCPUS;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Failures while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table can describe.
    #[error("{0} vCPUs requested; mirrorvm supports 1 to {MAX_VCPUS}")]
    TooManyCpus(u8),
    /// The table would run past the end of the EBDA.
    #[error("MP table of {0} bytes does not fit below 640 KiB")]
    TooLarge(usize),
    /// Guest memory write failed.
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

// The layout's constants at the widths the MP table stores them. The addresses are
// below 4 GiB and MAX_GSI is 23: none of these casts can truncate.
#[allow(clippy::cast_possible_truncation)]
const TABLE_ADDR: u32 = EBDA_START as u32 + 16;
#[allow(clippy::cast_possible_truncation)]
const IOAPIC_ADDR: u32 = IOAPIC_START as u32;
#[allow(clippy::cast_possible_truncation)]
const APIC_ADDR: u32 = APIC_START as u32;
#[allow(clippy::cast_possible_truncation)]
const MAX_IRQ: u8 = MAX_GSI as u8;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs, as the bytes
/// to place at [`EBDA_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let table_addr = TABLE_ADDR;
    let ioapic_id = cpus;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x0600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x0201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=MAX_IRQ {
        // ISA IRQ n arrives on IOAPIC pin n, as KVM's default GSI routing has it.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let table_len_u16 = u16::try_from(table_len).map_err(|_| MptableError::TooLarge(table_len))?;
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len_u16.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"MIRRORVM");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16 + table.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]);
    fp[10] = checksum(&fp[..16]);
    fp.extend_from_slice(&table);

    if fp.len() > crate::arch::to_usize(0xa0000 - EBDA_START) {
        return Err(MptableError::TooLarge(fp.len()));
    }
    Ok(fp)
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, MAX_VCPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let processors = table[44..]
                .chunks(20)
                .take(cpus as usize)
                .filter(|e| e[0] == 0)
                .count();
            assert_eq!(processors, cpus as usize);
        }
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert!(build(0).is_err());
        assert!(build(MAX_VCPUS + 1).is_err());
    }
}
