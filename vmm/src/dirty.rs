//! The dirty set of an epoch: KVM's dirty log (guest writes) united with the
//! vm-memory AtomicBitmap (writes the VMM and its devices made through vm-memory,
//! which KVM never sees), which pages to re-protect after a harvest (the hot-page
//! policy), and the copy of the dirty pages into a staging buffer so the guest can
//! resume before they are written out.
//!
//! # Manual re-protection and hot pages
//!
//! KVM tracks guest writes by write-protecting pages: the first write to a protected
//! page faults into KVM, which marks the page in its dirty bitmap and makes it
//! writable. On this project's hosts (software-nested KVM) that fault costs tens of
//! µs, against about a µs to copy a page. So the machine switches on
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` ([`enable_manual_protect`]): `KVM_GET_DIRTY_LOG`
//! then only reads the bitmap ([`read`]), and `KVM_CLEAR_DIRTY_LOG` ([`clear`])
//! clears the bits of chosen pages and write-protects them again. A page left
//! unprotected stays writable and stays set in KVM's bitmap, so every later harvest
//! reports it dirty and every cut copies it: nothing written to it can be missed.
//!
//! [`HotPages`] decides which pages stay writable: a page is *hot* when it was written
//! often enough in the epochs it was watched (protected) that copying it at every cut
//! costs less than the fault its next write would take
//! (`p · fault > (1 − p) · (copy + export)`, `p` its observed per-epoch write rate), and the hot
//! pages' copy fits the pause budget. The costs are [`HostCosts`]: the copy measured
//! at start-up, the fault measured at start-up by a probe VM
//! ([`crate::fault_probe`]; `MIRRORVM_FAULT_US` overrides it;
//! `docs/dirty-tracking.md` says why and how). A hot page holds a lease of a few
//! dozen epochs; when it ends the page is re-protected and watched again, so a page
//! that cooled down goes back to costing nothing.
//!
//! # The ordering rule
//!
//! A page's re-protection must be complete before its copy is taken and before the
//! vCPUs resume: read → clear → copy → resume. A write landing between a copy and a
//! later clear would be in neither that copy nor KVM's bitmap (the clear erased the
//! bit the earlier write had set, and the page, already writable, took no fault):
//! lost. The epoch engine's cut keeps that order (`epoch/cut.rs`); its model test's
//! fake dirty log models exactly this and a sabotage shows the test catches a broken
//! order. The pre-copy, which runs while the guest runs, reads and clears everything
//! before the exporter copies ([`DirtyLog::harvest`](crate::epoch::DirtyLog)).

use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Guest page size the dirty logs count in.
pub const PAGE_SIZE: usize = 4096;

const KVMIO: u32 = 0xAE;
vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Pages per `KVM_CLEAR_DIRTY_LOG` call at most (64 bitmap words, 16 MiB of guest
/// memory): a clear is issued per window that holds a page to re-protect, so a
/// sparse set costs few calls and no call walks a huge bitmap.
pub const CLEAR_CHUNK_PAGES: usize = 64 * 64;

/// Failures while harvesting dirty pages.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// KVM_GET_DIRTY_LOG failed.
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed: {source}")]
    GetLog {
        /// Memory slot.
        slot: u32,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// KVM_CLEAR_DIRTY_LOG failed.
    #[error("KVM_CLEAR_DIRTY_LOG for slot {slot}, pages {first}..+{count}, failed: {source}")]
    ClearLog {
        /// Memory slot.
        slot: u32,
        /// First page of the chunk.
        first: u64,
        /// Pages in the chunk.
        count: u32,
        /// Cause.
        source: std::io::Error,
    },
    /// Enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 failed.
    #[error("cannot enable manual dirty-log protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): {0}")]
    ManualProtect(#[source] kvm_ioctls::Error),
    /// A dirty set does not have the shape of guest memory.
    #[error("the dirty set has {got} regions or words where guest memory has {want}")]
    Shape {
        /// Expected count.
        want: usize,
        /// Count found.
        got: usize,
    },
    /// Copying a page out of guest memory failed.
    #[error("cannot copy guest page {0:#x}")]
    Copy(u64),
}

/// One bitmap word per 64 pages, per memory region (slot order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// (region start, bitmap words).
    pub regions: Vec<(u64, Vec<u64>)>,
}

impl DirtySet {
    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.regions
            .iter()
            .map(|(_, w)| w.iter().map(|x| x.count_ones() as usize).sum::<usize>())
            .sum()
    }

    /// Adds the pages of `other` to this set (a region this set lacks is added).
    pub fn union(&mut self, other: &DirtySet) {
        for (start, words) in &other.regions {
            match self.regions.iter_mut().find(|(s, _)| s == start) {
                Some((_, mine)) => {
                    if mine.len() < words.len() {
                        mine.resize(words.len(), 0);
                    }
                    for (m, w) in mine.iter_mut().zip(words) {
                        *m |= *w;
                    }
                }
                None => self.regions.push((*start, words.clone())),
            }
        }
        self.regions.sort_by_key(|(s, _)| *s);
    }

    /// Guest-physical addresses of the dirty pages, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(start, words)| {
            words.iter().enumerate().flat_map(move |(wi, &w)| {
                BitIter(w).map(move |b| start + ((wi * 64 + b) * PAGE_SIZE) as u64)
            })
        })
    }
}

struct BitIter(u64);

impl Iterator for BitIter {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(b)
    }
}

/// Switches on manual dirty-log protection for `vm`: from now on `KVM_GET_DIRTY_LOG`
/// ([`read`]) reports without re-protecting, and only [`clear`] re-protects. Pages
/// dirty before the switch stay set in KVM's bitmap until cleared, so nothing is
/// lost across it.
pub fn enable_manual_protect(vm: &VmFd) -> Result<(), DirtyError> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(DirtyError::ManualProtect)
}

/// Reads KVM's dirty log of every slot united with the VMM's own bitmap (which this
/// resets). Without manual protection (the VM as `KVM_GET_DIRTY_LOG` leaves it by
/// default) reading also clears KVM's log and re-protects every page it reports;
/// with it ([`enable_manual_protect`]) KVM's bits stay set until [`clear`]. Call with
/// the vCPUs parked and the device loop stopped at a cut (the caller is the device
/// loop), so the set is exactly the epoch's.
pub fn read(vm: &VmFd, mem: &GuestMemory) -> Result<DirtySet, DirtyError> {
    let mut regions = Vec::with_capacity(mem.num_regions());
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let mut words = vm
            .get_dirty_log(slot, crate::arch::to_usize(region.len()))
            .map_err(|source| DirtyError::GetLog { slot, source })?;
        // The region's own bitmap: vm-memory marks every write made through it.
        let ours = vm_memory::mmap::MmapRegion::bitmap(region).get_and_reset();
        for (w, o) in words.iter_mut().zip(ours.iter()) {
            *w |= *o;
        }
        regions.push((region.start_addr().0, words));
    }
    Ok(DirtySet { regions })
}

/// Reads and clears both dirty logs on a VM without manual protection (what
/// `KVM_GET_DIRTY_LOG` does by default). See [`read`].
pub fn harvest(vm: &VmFd, mem: &GuestMemory) -> Result<DirtySet, DirtyError> {
    read(vm, mem)
}

/// Clears the pages of `set` in KVM's dirty log and write-protects them again
/// (`KVM_CLEAR_DIRTY_LOG`, manual protection on), one call per window of
/// [`CLEAR_CHUNK_PAGES`] that holds a page to clear. When this returns, the next
/// write to any of these pages faults and is logged.
///
/// Ordering rule: call it before copying these pages and before the vCPUs resume.
/// A write between a copy and this clear would be erased from the log without being
/// in the copy.
pub fn clear(vm: &VmFd, mem: &GuestMemory, set: &DirtySet) -> Result<(), DirtyError> {
    if set.regions.len() != mem.num_regions() {
        return Err(DirtyError::Shape {
            want: mem.num_regions(),
            got: set.regions.len(),
        });
    }
    let chunk_words = CLEAR_CHUNK_PAGES / 64;
    for ((slot, region), (_, words)) in (0u32..).zip(mem.iter()).zip(&set.regions) {
        let pages = crate::arch::to_usize(region.len()) / PAGE_SIZE;
        if words.len() != pages.div_ceil(64) {
            return Err(DirtyError::Shape {
                want: pages.div_ceil(64),
                got: words.len(),
            });
        }
        for (ci, chunk) in words.chunks(chunk_words).enumerate() {
            if chunk.iter().all(|w| *w == 0) {
                continue;
            }
            let first = ci * CLEAR_CHUNK_PAGES;
            // A chunk is whole words (a multiple of 64 pages) except the slot's last,
            // which ends at the slot's end: both as KVM requires.
            let count = (chunk.len() * 64).min(pages - first);
            let mut bits = chunk.to_vec();
            let log = kvm_clear_dirty_log {
                slot,
                // Bounded by CLEAR_CHUNK_PAGES.
                num_pages: u32::try_from(count).unwrap_or(u32::MAX),
                first_page: first as u64,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: bits.as_mut_ptr().cast(),
                },
            };
            // `first_page` is a multiple of 64 and `num_pages` is a multiple of 64
            // or ends at the slot's end, so KVM reads no bit beyond `bits`.
            let req = KVM_CLEAR_DIRTY_LOG();
            // `bits` holds ceil(count / 64) words, every bit `num_pages` asks for.
            let log = &log;
            // SAFETY: `vm` is a VM fd; `log` is an initialised kvm_clear_dirty_log
            // whose bitmap points at `bits`, alive for the call; KVM only reads it.
            let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, req, log) };
            if ret != 0 {
                return Err(DirtyError::ClearLog {
                    slot,
                    first: first as u64,
                    count: log.num_pages,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(())
}

/// What re-protection costs on this host, as the hot-page policy weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCosts {
    /// A guest write to a write-protected page (the fault into KVM), ns.
    pub fault_ns: u64,
    /// Copying one page into the staging buffer at a cut, ns.
    pub copy_ns: u64,
    /// Sending one page to the sink (the exporter, off the pause but competing with
    /// the guest for the host and delaying the next cut), ns; learnt from exports.
    pub export_ns: u64,
}

/// The write-protection fault cost assumed when it is neither configured nor
/// measured (the start-up probe failed), ns: what the epoch benchmark measured on
/// the project's software-nested hosts (20–25 µs).
pub const DEFAULT_FAULT_NS: u64 = 20_000;

/// Where the policy's write-protection fault cost came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultFrom {
    /// `MIRRORVM_FAULT_US`.
    Environment,
    /// The start-up probe ([`crate::fault_probe`]).
    Probe,
    /// Neither: [`DEFAULT_FAULT_NS`] (the probe failed).
    Assumed,
}

impl std::fmt::Display for FaultFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FaultFrom::Environment => "MIRRORVM_FAULT_US",
            FaultFrom::Probe => "measured by the start-up probe",
            FaultFrom::Assumed => "assumed: the start-up probe failed",
        })
    }
}

impl HostCosts {
    /// Measures the page copy on this host (the fastest of 9 copies of 256 pages
    /// between two touched buffers: the cost without preemption, which a loaded
    /// host adds at random) and takes `fault_ns` as given. The policy refines the
    /// copy cost from the cuts' own copies ([`HotPages::observe_copy`]).
    pub fn measure(fault_ns: u64) -> Self {
        const N: usize = 256;
        let src = vec![0x5au8; N * PAGE_SIZE];
        let mut dst = vec![0xa5u8; N * PAGE_SIZE];
        let mut best = Duration::MAX;
        for _ in 0..9 {
            let s = Instant::now();
            for (d, s) in dst
                .chunks_exact_mut(PAGE_SIZE)
                .zip(std::hint::black_box(&src).chunks_exact(PAGE_SIZE))
            {
                d.copy_from_slice(s);
            }
            std::hint::black_box(&dst);
            best = best.min(s.elapsed());
        }
        let per_page = best.as_nanos() / N as u128;
        HostCosts {
            fault_ns: fault_ns.max(1),
            copy_ns: u64::try_from(per_page).unwrap_or(u64::MAX).max(1),
            export_ns: 0,
        }
    }
}

/// How a harvest re-protects pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protect {
    /// Every dirty page (what `KVM_GET_DIRTY_LOG` does without manual protection).
    All,
    /// Every dirty page but the hot ones ([`HotPages`]).
    Hot,
}

/// The hot-page policy's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotConfig {
    /// Protect everything at every cut (the policy before hot pages), or keep hot
    /// pages writable.
    pub policy: Protect,
    /// Host costs.
    pub costs: HostCosts,
    /// Where `costs.fault_ns` came from.
    pub fault_from: FaultFrom,
    /// Most time the copy of the hot pages may add to a pause.
    pub budget: Duration,
}

impl HotConfig {
    /// The default budget for `epoch`: a fifth of the epoch (the hot pages' copy
    /// then slows the guest by at most about 20 %), at most 10 ms.
    pub fn default_budget(epoch: Duration) -> Duration {
        (epoch / 5).min(Duration::from_millis(10))
    }

    /// The settings from the environment: `MIRRORVM_DIRTY_POLICY` (`hot`, the
    /// default, or `all`), `MIRRORVM_FAULT_US` (the fault cost; when it is unset,
    /// `probe` is called for it, and [`DEFAULT_FAULT_NS`] is taken when `probe`
    /// has none), `MIRRORVM_HOT_BUDGET_US` (default
    /// [`HotConfig::default_budget`]); the copy cost is measured here. Unparsable
    /// values fall back to the defaults.
    pub fn from_env(epoch: Duration, probe: impl FnOnce() -> Option<u64>) -> Self {
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let policy = match std::env::var("MIRRORVM_DIRTY_POLICY").as_deref() {
            Ok("all") => Protect::All,
            _ => Protect::Hot,
        };
        let (fault_ns, fault_from) = match num("MIRRORVM_FAULT_US") {
            Some(us) => (us.saturating_mul(1000), FaultFrom::Environment),
            None => match probe() {
                Some(ns) => (ns, FaultFrom::Probe),
                None => (DEFAULT_FAULT_NS, FaultFrom::Assumed),
            },
        };
        let budget = num("MIRRORVM_HOT_BUDGET_US")
            .map_or_else(|| Self::default_budget(epoch), Duration::from_micros);
        HotConfig {
            policy,
            costs: HostCosts::measure(fault_ns),
            fault_from,
            budget,
        }
    }
}

/// Epochs a page stays hot before it is re-protected and watched again.
pub const HOT_LEASE: u8 = 32;

/// Per-page history of one memory region.
#[derive(Debug, Clone, Default)]
struct RegionHistory {
    /// Bit i: the page was written in the i-th most recent epoch it was watched.
    hist: Vec<u8>,
    /// Epochs watched since its first recorded write, at most 8.
    obs: Vec<u8>,
    /// Epochs left in the page's hot lease; 0 when the page is protected.
    lease: Vec<u8>,
    /// One bit per page with a history or a lease (the pages worth visiting).
    tracked: Vec<u64>,
}

/// The hot-page policy: which dirty pages stay writable after a harvest.
///
/// A page is watched while protected: at each harvest, whether it was written in
/// the epoch is shifted into an 8-epoch history. A written page whose history holds
/// at least two writes, with `p` = writes / epochs watched since the first of them
/// (at most 8), becomes hot if
/// `p · fault > (1 − p) · (copy + export)` (a fault per write costs more than
/// copying and sending the page at every checkpoint) and the hot pages' copy stays within the pause budget
/// (`hot · copy ≤ budget`). A page written once is never hot: no policy avoids the
/// fault of a first write. A hot page is not re-protected for [`HOT_LEASE`] epochs
/// (staggered by page, so leases do not all end at once); it is reported dirty and
/// copied at every cut meanwhile. Then it is re-protected, and promoted again at
/// once if it is written in the next epoch (its history still says so).
#[derive(Debug, Clone)]
pub struct HotPages {
    config: HotConfig,
    /// The budget in force ([`HotPages::observe_epoch`]).
    budget: Duration,
    max_hot: usize,
    hot: usize,
    regions: Vec<RegionHistory>,
}

impl HotPages {
    /// A policy for regions of `pages[i]` pages each.
    pub fn new(pages: &[usize], config: HotConfig) -> Self {
        let budget_ns = u64::try_from(config.budget.as_nanos()).unwrap_or(u64::MAX);
        let max_hot = crate::arch::to_usize(budget_ns / config.costs.copy_ns.max(1));
        HotPages {
            config,
            budget: config.budget,
            max_hot,
            hot: 0,
            regions: pages
                .iter()
                .map(|&n| RegionHistory {
                    hist: vec![0; n],
                    obs: vec![0; n],
                    lease: vec![0; n],
                    tracked: vec![0; n.div_ceil(64)],
                })
                .collect(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &HotConfig {
        &self.config
    }

    /// Most pages the budget lets stay hot.
    pub fn max_hot(&self) -> usize {
        self.max_hot
    }

    /// Pages hot now.
    pub fn hot(&self) -> usize {
        self.hot
    }

    /// A cut copied `pages` pages in `took`: the copy cost the budget divides by
    /// follows what cuts really cost (a moving average, 1/4 weight to the newest;
    /// an observation counts as at most twice the estimate, so one slow cut, such
    /// as the first into a fresh staging buffer, does not collapse the hot set;
    /// cuts of fewer than 256 pages are too small to time).
    pub fn observe_copy(&mut self, pages: usize, took: Duration) {
        if pages < 256 {
            return;
        }
        let per_page = u64::try_from(took.as_nanos() / pages as u128).unwrap_or(u64::MAX);
        let c = &mut self.config.costs.copy_ns;
        let seen = per_page.min(c.saturating_mul(2));
        *c = ((*c * 3 + seen) / 4).max(1);
        self.rebudget();
    }

    /// A checkpoint of `pages` pages took `took` to export: the cost of sending a
    /// page follows it (a moving average, 1/4 weight to the newest, an observation
    /// counting as at most twice the estimate; exports of fewer than 256 pages are
    /// dominated by fixed costs and ignored).
    pub fn observe_export(&mut self, pages: usize, took: Duration) {
        if pages < 256 {
            return;
        }
        let per_page = u64::try_from(took.as_nanos() / pages as u128).unwrap_or(u64::MAX);
        let e = &mut self.config.costs.export_ns;
        *e = if *e == 0 {
            per_page
        } else {
            // As for copies, one slow export (the exporter preempted on a busy
            // host) counts as twice the estimate at most.
            let seen = per_page.min(e.saturating_mul(2));
            (e.saturating_mul(3).saturating_add(seen)) / 4
        };
    }

    /// The epoch that just ended lasted `epoch` (longer than configured when a slow
    /// export postponed the cut). The budget is a fifth of it, but never below the
    /// configured budget nor above four times it: a long epoch gives its faults
    /// more time to add up, and its pause more time to be amortised over.
    pub fn observe_epoch(&mut self, epoch: Duration) {
        self.budget = (epoch / 5).clamp(self.config.budget, self.config.budget * 4);
        self.rebudget();
    }

    /// The pause budget in force.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    fn rebudget(&mut self) {
        let budget_ns = u64::try_from(self.budget.as_nanos()).unwrap_or(u64::MAX);
        self.max_hot = crate::arch::to_usize(budget_ns / self.config.costs.copy_ns.max(1));
    }

    /// Whether a page written in `writes` of the last `obs` epochs it was watched
    /// is worth keeping writable.
    fn worth_it(&self, writes: u32, obs: u32) -> bool {
        if writes < 2 || obs < writes {
            return false;
        }
        let (f, c) = (
            u128::from(self.config.costs.fault_ns),
            u128::from(self.config.costs.copy_ns) + u128::from(self.config.costs.export_ns),
        );
        // p · fault > (1 − p) · (copy + export) with p = writes / obs.
        u128::from(writes) * f > u128::from(obs - writes) * c
    }

    /// Decides, for `set` just read from the log, which of its pages to re-protect
    /// (returned, same shape), and advances every page's history. With
    /// [`Protect::All`] (or the policy `all`) it is every page of `set`, and every
    /// hot page loses its lease.
    pub fn choose(&mut self, set: &DirtySet, how: Protect) -> DirtySet {
        if how == Protect::All || self.config.policy == Protect::All {
            self.cool_all();
            return set.clone();
        }
        let mut out = DirtySet {
            regions: Vec::with_capacity(set.regions.len()),
        };
        for (ri, (start, words)) in set.regions.iter().enumerate() {
            let mut protect = vec![0u64; words.len()];
            let Some(r) = self.regions.get(ri) else {
                // A region the policy does not know: protect all of it.
                out.regions.push((*start, words.clone()));
                continue;
            };
            let n = r.hist.len();
            for wi in 0..words.len().min(r.tracked.len()) {
                let dirty = words[wi];
                let mut visit = dirty | self.regions[ri].tracked[wi];
                while visit != 0 {
                    let b = visit.trailing_zeros() as usize;
                    visit &= visit - 1;
                    let p = wi * 64 + b;
                    if p >= n {
                        break;
                    }
                    let written = dirty & (1 << b) != 0;
                    let r = &mut self.regions[ri];
                    if r.lease[p] > 0 {
                        // Hot: writable, reported dirty at every harvest.
                        r.lease[p] -= 1;
                        if r.lease[p] == 0 {
                            // Watched again from the next epoch on. KVM kept its bit
                            // set while it was writable, so it is in `set`.
                            self.hot -= 1;
                            protect[wi] |= 1 << b;
                        }
                        continue;
                    }
                    r.hist[p] = (r.hist[p] << 1) | u8::from(written);
                    r.obs[p] = if r.hist[p] == 0 {
                        0
                    } else {
                        (r.obs[p] + 1).min(8)
                    };
                    let (writes, obs) = (r.hist[p].count_ones(), u32::from(r.obs[p]));
                    if written && self.hot < self.max_hot && self.worth_it(writes, obs) {
                        let r = &mut self.regions[ri];
                        // Staggered so that leases taken together end apart.
                        let stagger = p % usize::from(HOT_LEASE / 2);
                        r.lease[p] = HOT_LEASE / 2 + u8::try_from(stagger).unwrap_or(0);
                        r.tracked[wi] |= 1 << b;
                        self.hot += 1;
                        continue;
                    }
                    let r = &mut self.regions[ri];
                    if written {
                        protect[wi] |= 1 << b;
                    }
                    if r.hist[p] == 0 {
                        r.tracked[wi] &= !(1 << b);
                    } else {
                        r.tracked[wi] |= 1 << b;
                    }
                }
            }
            // Words beyond what the policy tracks (none in practice): protect.
            let known = self.regions[ri].tracked.len();
            for (p, w) in protect.iter_mut().zip(words).skip(known) {
                *p = *w;
            }
            out.regions.push((*start, protect));
        }
        out
    }

    /// Ends every lease: the pages are about to be re-protected (a pre-copy pass).
    fn cool_all(&mut self) {
        if self.hot == 0 {
            return;
        }
        for r in &mut self.regions {
            r.lease.iter_mut().for_each(|l| *l = 0);
        }
        self.hot = 0;
    }
}

/// Dirty pages copied out of guest memory: addresses and their contents.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StagedPages {
    /// Guest-physical address of each page.
    pub addrs: Vec<u64>,
    /// `addrs.len() * PAGE_SIZE` bytes, page *i* at `i * PAGE_SIZE`.
    pub data: Vec<u8>,
}

impl StagedPages {
    /// Copies the pages of `set` out of `mem`, reusing `self`'s buffers. Runs of
    /// adjacent pages are copied with one memcpy each.
    ///
    /// At a cut, call only with the guest quiescent (vCPUs parked, device loop
    /// stopped): the copy reads guest memory directly. A pre-copy round calls it while
    /// the guest runs: a page torn by a concurrent write was logged dirty again when
    /// it was written (the harvest write-protected it), so a later round or the cut
    /// sends it again.
    pub fn copy_from(&mut self, mem: &GuestMemory, set: &DirtySet) -> Result<(), DirtyError> {
        self.addrs.clear();
        self.addrs.extend(set.pages());
        let total = self.addrs.len() * PAGE_SIZE;
        // Grow without zero-filling what is about to be overwritten.
        if self.data.len() < total {
            self.data.resize(total, 0);
        } else {
            self.data.truncate(total);
        }
        let mut i = 0;
        while i < self.addrs.len() {
            let start = self.addrs[i];
            let mut n = 1;
            while i + n < self.addrs.len() && self.addrs[i + n] == start + (n * PAGE_SIZE) as u64 {
                n += 1;
            }
            let len = n * PAGE_SIZE;
            let slice = mem
                .get_slice(GuestAddress(start), len)
                .map_err(|_| DirtyError::Copy(start))?;
            let dst = &mut self.data[i * PAGE_SIZE..i * PAGE_SIZE + len];
            // `slice` maps `len` bytes inside one region (get_slice fails across
            // regions) and `dst` is a host buffer of the same length: all of it is
            // copied. The guest is quiescent (the caller's contract), so the source
            // is stable.
            let copied = slice.copy_to(dst);
            debug_assert_eq!(copied, len);
            i += n;
        }
        Ok(())
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Whether no page is staged.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn pages_of_a_set() {
        let set = DirtySet {
            regions: vec![(0, vec![0b1001, 0]), (1 << 32, vec![1 << 63])],
        };
        let pages: Vec<u64> = set.pages().collect();
        assert_eq!(pages, vec![0, 3 * 4096, (1 << 32) + 63 * 4096]);
        assert_eq!(set.count(), 3);
    }

    #[test]
    fn a_union_holds_the_pages_of_both_sets() {
        let mut a = DirtySet {
            regions: vec![(1 << 32, vec![1]), (0, vec![0b01])],
        };
        a.regions.sort_by_key(|(s, _)| *s);
        let b = DirtySet {
            regions: vec![(0, vec![0b10, 1]), (1 << 40, vec![4])],
        };
        a.union(&b);
        let pages: Vec<u64> = a.pages().collect();
        assert_eq!(
            pages,
            vec![0, 4096, 64 * 4096, 1 << 32, (1 << 40) + 2 * 4096]
        );
        // A union with itself adds nothing.
        let before = a.clone();
        a.union(&before);
        assert_eq!(a, before);
    }

    #[test]
    fn runs_and_single_pages_are_copied() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for p in [2u64, 3, 4, 9] {
            mem.write_obj(p * 1000 + 7, GuestAddress(p * 4096 + 16))
                .unwrap();
        }
        let set = DirtySet {
            regions: vec![(0, vec![(1 << 2) | (1 << 3) | (1 << 4) | (1 << 9)])],
        };
        let mut staged = StagedPages::default();
        staged.copy_from(&mem, &set).unwrap();
        assert_eq!(staged.addrs, vec![2 * 4096, 3 * 4096, 4 * 4096, 9 * 4096]);
        for (i, p) in [2u64, 3, 4, 9].iter().enumerate() {
            let v = u64::from_le_bytes(
                staged.data[i * 4096 + 16..i * 4096 + 24]
                    .try_into()
                    .unwrap(),
            );
            assert_eq!(v, p * 1000 + 7);
        }
        // A smaller set reuses the buffer and shrinks the view.
        let one = DirtySet {
            regions: vec![(0, vec![1 << 9])],
        };
        staged.copy_from(&mem, &one).unwrap();
        assert_eq!(staged.data.len(), 4096);
    }

    #[test]
    fn device_writes_are_in_our_bitmap_and_staged() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(5 * 4096 + 8))
            .unwrap();
        let region = mem.iter().next().unwrap();
        let words = vm_memory::mmap::MmapRegion::bitmap(region).get_and_reset();
        assert_eq!(words[0], 1 << 5);
        let set = DirtySet {
            regions: vec![(0, words)],
        };
        let mut staged = StagedPages::default();
        staged.copy_from(&mem, &set).unwrap();
        assert_eq!(staged.addrs, vec![5 * 4096]);
        assert_eq!(&staged.data[8..12], &0xdead_beef_u32.to_le_bytes());
        // Reading does not dirty.
        let again = vm_memory::mmap::MmapRegion::bitmap(mem.iter().next().unwrap()).get_and_reset();
        assert!(again.iter().all(|w| *w == 0));
    }

    fn policy(max_hot_us: u64) -> HotPages {
        HotPages::new(
            &[256],
            HotConfig {
                policy: Protect::Hot,
                costs: HostCosts {
                    fault_ns: 20_000,
                    copy_ns: 1_000,
                    export_ns: 0,
                },
                fault_from: FaultFrom::Environment,
                budget: Duration::from_micros(max_hot_us),
            },
        )
    }

    fn set_of(pages: &[usize]) -> DirtySet {
        let mut words = vec![0u64; 4];
        for p in pages {
            words[p / 64] |= 1 << (p % 64);
        }
        DirtySet {
            regions: vec![(0, words)],
        }
    }

    fn protected(set: &DirtySet) -> Vec<usize> {
        set.pages()
            .map(|a| crate::arch::to_usize(a) / PAGE_SIZE)
            .collect()
    }

    #[test]
    fn a_page_written_every_epoch_becomes_hot_and_stays_dirty() {
        let mut h = policy(100);
        // Epoch 1: first write, protected again (one write is no pattern).
        assert_eq!(protected(&h.choose(&set_of(&[3]), Protect::Hot)), vec![3]);
        assert_eq!(h.hot(), 0);
        // Epoch 2: written again: hot, left writable.
        assert!(protected(&h.choose(&set_of(&[3]), Protect::Hot)).is_empty());
        assert_eq!(h.hot(), 1);
        // While hot, KVM reports it at every harvest and it is not re-protected...
        let mut epochs = 0;
        while h.hot() == 1 {
            let chosen = protected(&h.choose(&set_of(&[3]), Protect::Hot));
            epochs += 1;
            if h.hot() == 1 {
                assert!(chosen.is_empty());
            } else {
                // ... until its lease ends: then it is re-protected and watched.
                assert_eq!(chosen, vec![3]);
            }
            assert!(epochs <= usize::from(HOT_LEASE));
        }
        assert!(epochs >= usize::from(HOT_LEASE / 2));
        // Written in the next epoch: hot again at once.
        assert!(protected(&h.choose(&set_of(&[3]), Protect::Hot)).is_empty());
        assert_eq!(h.hot(), 1);
    }

    #[test]
    fn pages_written_once_are_never_hot() {
        let mut h = policy(100);
        for p in 0..256 {
            assert_eq!(protected(&h.choose(&set_of(&[p]), Protect::Hot)), vec![p]);
        }
        assert_eq!(h.hot(), 0);
    }

    #[test]
    fn the_budget_bounds_the_hot_set() {
        let mut h = policy(10); // 10 µs / 1 µs a copy: 10 hot pages at most.
        let all: Vec<usize> = (0..256).collect();
        h.choose(&set_of(&all), Protect::Hot);
        let second = h.choose(&set_of(&all), Protect::Hot);
        assert_eq!(h.hot(), 10);
        assert_eq!(second.count(), 246);
    }

    #[test]
    fn rarely_written_pages_stay_protected_when_faults_are_cheap() {
        // Faults as cheap as copies: a page written every third epoch is not worth a
        let mut h = HotPages::new(
            &[256],
            HotConfig {
                policy: Protect::Hot,
                costs: HostCosts {
                    fault_ns: 1_000,
                    copy_ns: 1_000,
                    export_ns: 0,
                },
                fault_from: FaultFrom::Environment,
                budget: Duration::from_millis(1),
            },
        );
        // copy at every cut (2 · 1 > 2 · 1 is false: written in 2 of 4 epochs).
        assert_eq!(protected(&h.choose(&set_of(&[7]), Protect::Hot)), vec![7]);
        for _ in 0..2 {
            assert!(protected(&h.choose(&set_of(&[]), Protect::Hot)).is_empty());
        }
        assert_eq!(protected(&h.choose(&set_of(&[7]), Protect::Hot)), vec![7]);
        assert_eq!(h.hot(), 0);
        // Written again in the next epoch (3 of 5): now it is (3 > 2).
        assert!(protected(&h.choose(&set_of(&[7]), Protect::Hot)).is_empty());
        assert_eq!(h.hot(), 1);
    }

    #[test]
    fn one_slow_export_counts_as_twice_the_estimate_at_most() {
        let mut h = policy(100);
        h.observe_export(1000, Duration::from_millis(1));
        assert_eq!(h.config().costs.export_ns, 1000);
        // A preempted exporter: 22 µs a page once.
        h.observe_export(1000, Duration::from_millis(22));
        assert_eq!(h.config().costs.export_ns, 1250);
        // A real change still comes through, over a few exports.
        for _ in 0..20 {
            h.observe_export(1000, Duration::from_millis(3));
        }
        assert!((2900..=3000).contains(&h.config().costs.export_ns));
    }

    #[test]
    fn protect_all_and_the_all_policy_protect_every_page() {
        let mut h = policy(100);
        h.choose(&set_of(&[1, 2]), Protect::Hot);
        h.choose(&set_of(&[1, 2]), Protect::Hot);
        assert_eq!(h.hot(), 2);
        // A pre-copy pass: everything, leases end.
        assert_eq!(
            protected(&h.choose(&set_of(&[1, 2, 9]), Protect::All)),
            vec![1, 2, 9]
        );
        assert_eq!(h.hot(), 0);
        let mut all = policy(100);
        all.config.policy = Protect::All;
        for _ in 0..4 {
            assert_eq!(
                protected(&all.choose(&set_of(&[1, 2]), Protect::Hot)),
                vec![1, 2]
            );
        }
        assert_eq!(all.hot(), 0);
    }

    #[test]
    fn the_budget_follows_the_epochs_and_the_copies_cuts_make() {
        let mut h = policy(1000); // 1 ms at 1 µs a page: 1,000 pages.
        assert_eq!(h.max_hot(), 1000);
        // A long epoch (a postponed cut): a fifth of it, at most 4× the budget.
        h.observe_epoch(Duration::from_millis(10));
        assert_eq!(h.max_hot(), 2000);
        h.observe_epoch(Duration::from_secs(1));
        assert_eq!(h.max_hot(), 4000);
        h.observe_epoch(Duration::from_millis(1));
        assert_eq!(h.max_hot(), 1000);
        // One very slow cut counts as twice the estimate at most.
        h.observe_copy(1000, Duration::from_millis(100));
        assert_eq!(h.max_hot(), 800);
        let mut h = policy(1000);
        // Cuts copying at 0.5 µs a page: the estimate moves towards it.
        for _ in 0..40 {
            h.observe_copy(4000, Duration::from_millis(2));
        }
        assert!((1900..=2000).contains(&h.max_hot()), "{}", h.max_hot());
        // Too few pages to time: ignored.
        h.observe_copy(10, Duration::from_secs(1));
        assert!(h.max_hot() >= 1900);
    }

    #[test]
    fn a_dear_export_keeps_rarely_written_pages_protected() {
        // Fault 20 µs, copy 1 µs: a page written every fourth epoch is hot...
        let every_fourth = |h: &mut HotPages| {
            h.choose(&set_of(&[5]), Protect::Hot);
            for _ in 0..3 {
                h.choose(&set_of(&[]), Protect::Hot);
            }
            h.choose(&set_of(&[5]), Protect::Hot);
        };
        let mut cheap = policy(100);
        every_fourth(&mut cheap);
        assert_eq!(cheap.hot(), 1);
        // ... but not when sending a page costs 20 µs more: 2 · 20 < 3 · 21.
        let mut dear = policy(100);
        dear.observe_export(1000, Duration::from_millis(20));
        every_fourth(&mut dear);
        assert_eq!(dear.hot(), 0);
        // A page written in every epoch stays worth it: 8 · 20 > 0.
        dear.choose(&set_of(&[9]), Protect::Hot);
        dear.choose(&set_of(&[9]), Protect::Hot);
        assert_eq!(dear.hot(), 1);
    }

    #[test]
    fn host_costs_are_measured_and_never_zero() {
        let c = HostCosts::measure(0);
        assert_eq!(c.fault_ns, 1);
        assert!(c.copy_ns >= 1);
    }
}
