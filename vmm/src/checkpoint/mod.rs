//! Checkpoints: what a cut produces, where checkpoints go, and where a restore reads
//! them from.
//!
//! - [`Checkpoint`]: one cut, staged in memory: dirty pages, encoded machine state,
//!   and the disk regions frozen at the cut (their data for a sink that keeps its own
//!   disk copy, their metadata for one that shares the disks' journals).
//! - [`Manifest`]: the one-time facts of a checkpoint stream (memory, vCPUs, disks,
//!   command line). A sink receives it once, in [`CheckpointSink::begin`], not in
//!   every 25 ms checkpoint.
//! - [`sink`]: the [`CheckpointSink`] trait, the one seam every destination plugs
//!   into: the [`directory`] sink now, the peer (a standby host) next.
//! - [`source`]: the [`CheckpointSource`] trait a restore reads from: a directory, or
//!   a replica whose memory is already in place (a standby taking over).
//! - [`format`]: the checkpoint file format, pure encode/decode, no file system.
//! - [`pagecodec`]: a batch of pages as bytes (zero bitmap, lz4), for files and frames.

pub mod directory;
pub mod format;
pub mod pagecodec;
pub mod replay;
pub mod sink;
pub mod source;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::config::DiskConfig;
use crate::dirty::{StagedPages, PAGE_SIZE};
use crate::memory::GuestMemory;
use crate::vcpu::VcpuState;
use crate::vm_state::VmState;

pub use sink::{BaseDelta, CheckpointSink, SinkError, StorageMode};

/// The name of a replica: the checkpoint it holds, in the lineage that cut it. A
/// lineage is a random number drawn whenever a host starts cutting checkpoints of a
/// guest from some point (a boot, a restore, a takeover): two hosts that resumed the
/// same checkpoint cut different lineages from there, so equal names mean equal
/// memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaId {
    /// The lineage that cut the checkpoint.
    pub lineage: u64,
    /// The checkpoint.
    pub epoch: u64,
}

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint {} of lineage {:016x}",
            self.epoch, self.lineage
        )
    }
}

/// A new lineage number (see [`ReplicaId`]): random, never 0.
pub fn new_lineage() -> u64 {
    let mut b = [0u8; 8];
    // getrandom(2) without flags blocks only before the kernel's pool is seeded.
    // SAFETY: `b` is a valid, writable 8-byte buffer that outlives the call; the
    // kernel writes at most `b.len()` bytes into it.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let v = u64::from_le_bytes(b);
    if n == 8 && v != 0 {
        return v;
    }
    // Without getrandom: the time and the process id, still unique per start.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    #[allow(clippy::cast_possible_truncation)]
    let t = t as u64;
    (t ^ (u64::from(std::process::id()) << 32)) | 1
}
pub use source::{CheckpointSource, Restored, SourceError};

/// One disk of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskManifest {
    /// How it was attached.
    pub config: DiskConfig,
    /// Its size in bytes (a peer's copy must have the same).
    pub size: u64,
    /// The journal id of a checkpointed disk: a restore checks it before recovering,
    /// so a swapped or recreated journal is refused instead of being recovered to
    /// the wrong history.
    pub journal_id: Option<u64>,
    /// The region size of a checkpointed disk's journal (bytes of records per
    /// region), read from the journal itself: a standby sizes its own journal's
    /// regions from it. Absent from manifests written before it existed.
    #[serde(default)]
    pub region_size: Option<u64>,
}

/// The one-time facts of a checkpoint stream: what a restore needs to rebuild the
/// same machine before it applies any checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Guest memory in bytes (the layout follows from it: `memory::ram_ranges`).
    pub memory: u64,
    /// vCPU count.
    pub cpus: u8,
    /// The guest's command line (with devices appended).
    pub cmdline: String,
    /// Disks, in attach order.
    pub disks: Vec<DiskManifest>,
    /// The CPU the guest was started with (a standby checks its host against it).
    #[serde(default)]
    pub cpu: crate::cpuid::GuestCpu,
}

/// Everything but memory, at a cut.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// Device state, postcard-encoded by the machine's devices.
    pub devices: Vec<u8>,
}

/// What a checkpoint carries of one disk's region frozen at its cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionContent {
    /// Metadata only: the sink shares the disk's journal (a local directory; shared
    /// storage).
    Meta(devices::store::RegionMeta),
    /// Metadata and the final contents of every sector: the sink keeps its own copy
    /// of the disk (replicated storage).
    Data(devices::store::Export),
}

/// One disk's region frozen at a cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRegion {
    /// The disk's index in attach order.
    pub disk: usize,
    /// What travels of it.
    pub content: RegionContent,
}

/// One checkpoint, staged in memory at the cut.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// Its epoch.
    pub epoch: u64,
    /// Whether it completes a base image (the first checkpoint after a pre-copy).
    pub full: bool,
    /// The encoded [`MachineState`].
    pub state: Vec<u8>,
    /// The dirty pages.
    pub pages: StagedPages,
    /// The disk regions frozen at its cut, filled in when they are sealed (on the
    /// exporter, after the guest resumed).
    pub disks: Vec<DiskRegion>,
    /// The console output of its epoch (held on the primary until it is complete).
    pub console: Console,
}

/// Console bytes and their offset in the guest's console stream (bytes since boot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Console {
    /// Offset of the first byte in the stream.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// Failures encoding or applying checkpoint content.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The machine state could not be encoded.
    #[error("cannot encode the machine state")]
    Encode(#[source] postcard::Error),
    /// The machine state could not be decoded.
    #[error("cannot decode the machine state")]
    Decode(#[source] postcard::Error),
    /// A page lies outside guest memory.
    #[error("page {0:#x} is outside guest memory")]
    PageOutside(u64),
    /// A page's stored form does not expand to one page.
    #[error("page {0:#x} is not a valid lz4 block of one page")]
    CorruptPage(u64),
    /// The staged pages and their addresses disagree.
    #[error("{addrs} page addresses for {bytes} bytes of page data")]
    Malformed {
        /// Addresses.
        addrs: usize,
        /// Data bytes.
        bytes: usize,
    },
}

/// Encodes the machine state.
pub fn encode_state(state: &MachineState) -> Result<Vec<u8>, ContentError> {
    postcard::to_stdvec(state).map_err(ContentError::Encode)
}

/// Decodes the machine state.
pub fn decode_state(bytes: &[u8]) -> Result<MachineState, ContentError> {
    postcard::from_bytes(bytes).map_err(ContentError::Decode)
}

/// Writes checkpoint pages into guest memory: how every source brings memory to a
/// checkpoint (a directory replaying its chain, a standby applying what arrived).
/// Every address is checked against `mem` before anything is written.
pub fn apply_pages(mem: &GuestMemory, pages: &StagedPages) -> Result<(), ContentError> {
    apply_batches(mem, std::slice::from_ref(pages))
}

/// Writes a checkpoint's batches of pages into guest memory, all or nothing: see
/// [`check_batches`].
pub fn apply_batches(mem: &GuestMemory, batches: &[StagedPages]) -> Result<(), ContentError> {
    check_batches(mem, batches)?.write()
}

/// A checkpoint's pages whose shape and addresses were checked against one guest
/// memory: writing them cannot fail on anything the sender controls.
pub struct CheckedPages<'a> {
    mem: &'a GuestMemory,
    batches: &'a [StagedPages],
}

/// Checks every batch's shape and every address against `mem` before any page is
/// written, so a bad batch late in a checkpoint cannot leave memory half at the old
/// checkpoint and half at the new one (a standby checks before it imports the
/// checkpoint's disk regions, too).
pub fn check_batches<'a>(
    mem: &'a GuestMemory,
    batches: &'a [StagedPages],
) -> Result<CheckedPages<'a>, ContentError> {
    for pages in batches {
        if pages.addrs.len().checked_mul(PAGE_SIZE) != Some(pages.data.len()) {
            return Err(ContentError::Malformed {
                addrs: pages.addrs.len(),
                bytes: pages.data.len(),
            });
        }
        for &gpa in &pages.addrs {
            if mem.get_slice(GuestAddress(gpa), PAGE_SIZE).is_err() {
                return Err(ContentError::PageOutside(gpa));
            }
        }
    }
    Ok(CheckedPages { mem, batches })
}

impl CheckedPages<'_> {
    /// Writes the pages, in order.
    pub fn write(self) -> Result<(), ContentError> {
        for pages in self.batches {
            for (gpa, page) in pages.addrs.iter().zip(pages.data.chunks_exact(PAGE_SIZE)) {
                self.mem
                    .write_slice(page, GuestAddress(*gpa))
                    .map_err(|_| ContentError::PageOutside(*gpa))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn pages_are_applied_or_refused_whole() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
        let mut data = vec![0u8; 2 * PAGE_SIZE];
        data[0] = 0xaa;
        data[PAGE_SIZE] = 0xbb;
        let good = StagedPages {
            addrs: vec![3 * PAGE_SIZE as u64, 5 * PAGE_SIZE as u64],
            data: data.clone(),
        };
        apply_pages(&mem, &good).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * 4096)).unwrap(), 0xaa);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(5 * 4096)).unwrap(), 0xbb);

        // One page outside memory: nothing at all is written.
        let bad = StagedPages {
            addrs: vec![7 * PAGE_SIZE as u64, 16 * PAGE_SIZE as u64],
            data,
        };
        assert!(matches!(
            apply_pages(&mem, &bad),
            Err(ContentError::PageOutside(a)) if a == 16 * 4096
        ));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(7 * 4096)).unwrap(), 0);

        let short = StagedPages {
            addrs: vec![0],
            data: vec![0; 10],
        };
        assert!(matches!(
            apply_pages(&mem, &short),
            Err(ContentError::Malformed { .. })
        ));
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn a_bad_batch_late_in_a_checkpoint_leaves_every_earlier_batch_unwritten() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
        let page = |fill: u8| vec![fill; PAGE_SIZE];
        let first = StagedPages {
            addrs: vec![PAGE_SIZE as u64],
            data: page(0x11),
        };
        let second_bad = StagedPages {
            addrs: vec![2 * PAGE_SIZE as u64, 99 * PAGE_SIZE as u64],
            data: [page(0x22), page(0x33)].concat(),
        };
        let third_short = StagedPages {
            addrs: vec![4 * PAGE_SIZE as u64],
            data: vec![0x44; 8],
        };
        for batches in [
            vec![first.clone(), second_bad],
            vec![first.clone(), third_short],
        ] {
            assert!(apply_batches(&mem, &batches).is_err());
            for p in 0..16u64 {
                assert_eq!(mem.read_obj::<u8>(GuestAddress(p * 4096)).unwrap(), 0);
            }
        }
        // A checked checkpoint is written whole.
        let second = StagedPages {
            addrs: vec![2 * PAGE_SIZE as u64],
            data: page(0x22),
        };
        check_batches(&mem, &[first, second])
            .unwrap()
            .write()
            .unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0x11);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(2 * 4096)).unwrap(), 0x22);
    }
}
