//! The start-up fault probe: what a write-protection fault costs on this host.
//!
//! The hot-page policy ([`crate::dirty::HotPages`]) weighs the fault a write to a
//! re-protected page takes against copying that page at every cut. The copy is
//! measured in the VMM's own process ([`crate::dirty::HostCosts::measure`]); the
//! fault can only be measured by a guest, and on this project's hosts only by guest
//! code at CPL3: at CPL0 the software-nested KVM (`kvm_pvm`) emulates instructions
//! and its emulator marks pages dirty without taking the fault
//! (`docs/dirty-tracking.md`).
//!
//! So [`measure`] builds a tiny VM of its own: one vCPU put straight into 64-bit
//! long mode at CPL3 through `KVM_SET_SREGS` (user code and data segments, identity
//! page tables with the user bit, no IDT: the probe code cannot fault), 1 MiB of
//! memory in a dirty-logged slot with manual re-protection, as the machine's own
//! memory has it. Its 24 bytes of code write one byte into each of
//! [`PROBE_PAGES`] pages, then write to an address outside the slot (an MMIO exit
//! back to the VMM), and start over at the next `KVM_RUN`. After a warm-up pass
//! (first touches of host memory, KVM's mappings), each round re-protects the pages
//! (`KVM_CLEAR_DIRTY_LOG`), times one pass (every write faults), checks in the dirty
//! log that every page was logged, then times a second pass over the now writable
//! pages (no fault). Per round, the difference of the two passes ÷ the pages is the
//! fault; entering and leaving the guest cancels out. The probe keeps the cheapest
//! round (the cost without preemption, which a loaded host adds at random, as the
//! copy measurement does).
//!
//! It costs a VM's creation (~0.5 ms here) plus `(rounds + 1) × pages` faults (the
//! warm-up's first touches cost a little more): on the development hosts (faults
//! of ~20–25 µs), with the default 16 pages and 4 rounds, about 3.5 ms in all
//! (release build, load average 4.4; more when the host is busier);
//! [`FaultProbe::took`] says.
//! A watchdog stops a `KVM_RUN` that does not return within [`RUN_DEADLINE`].

use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_cpuid_entry2, kvm_regs, kvm_segment, CpuId};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::dirty::{self, DirtySet, PAGE_SIZE};
use crate::memory::GuestMemory;

/// Pages written per pass.
pub const PROBE_PAGES: usize = 16;
/// Timed rounds (one protected and one writable pass each).
pub const PROBE_ROUNDS: usize = 4;
/// Longest a single `KVM_RUN` of the probe may take before the watchdog stops it.
pub const RUN_DEADLINE: Duration = Duration::from_millis(500);

/// The probe VM's memory: one slot of 1 MiB from guest-physical 0.
const MEM_SIZE: usize = 1 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
/// One page table: the first 2 MiB in 4 KiB pages.
const PT: u64 = 0x4000;
const CODE: u64 = 0x6000;
/// The first probe page; the others follow, one every 4 KiB.
const DATA: u64 = 0x10000;
/// Mapped by the page table but outside the slot: a write there is an MMIO exit.
const EXIT_ADDR: u64 = 0x1f_f000;
/// The byte the probe writes (and the MMIO exit carries).
const MARK: u8 = 0x5a;

/// Present, writable, user; accessed (and, on leaf entries, dirty) preset, so KVM
/// never has to write them back into the page tables during a pass.
const PTE_UPPER: u64 = 0x27;
const PTE_LEAF: u64 = 0x67;

/// ```text
/// start: mov %r8, %rdi        ; first page
///        mov %r9, %rcx        ; pages
/// 1:     mov %al, (%rdi)      ; one write per page
///        add $0x1000, %rdi
///        dec %rcx
///        jnz 1b
///        mov %al, (%rbx)      ; MMIO exit: the pass is done
///        jmp start            ; the next KVM_RUN makes another pass
/// ```
const PROBE_CODE: [u8; 24] = [
    0x4c, 0x89, 0xc7, 0x4c, 0x89, 0xc9, 0x88, 0x07, 0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0x48,
    0xff, 0xc9, 0x75, 0xf2, 0x88, 0x03, 0xeb, 0xe8,
];

/// Failures of the fault probe.
#[derive(Debug, thiserror::Error)]
pub enum FaultProbeError {
    /// Opening /dev/kvm failed.
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    /// A KVM ioctl on the probe VM or its vCPU failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Allocating or registering the probe's memory failed.
    #[error("the probe's memory: {0}")]
    Memory(String),
    /// Writing the probe's page tables or code failed.
    #[error("cannot write the probe's {what}: {source}")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Cause.
        source: vm_memory::GuestMemoryError,
    },
    /// Reading or clearing the probe VM's dirty log failed.
    #[error("the probe's dirty log: {0}")]
    Dirty(#[from] dirty::DirtyError),
    /// The probe code stopped with something other than its MMIO exit.
    #[error("the probe guest stopped unexpectedly: {0}")]
    Exit(String),
    /// A pass did not end within [`RUN_DEADLINE`].
    #[error("a pass of the probe guest did not end within {0:?}")]
    Stuck(Duration),
    /// The watchdog thread could not be started.
    #[error("cannot start the probe's watchdog thread: {0}")]
    Watchdog(#[source] std::io::Error),
    /// A protected pass wrote pages the dirty log did not report.
    #[error("the dirty log reported {logged} of the {written} pages a pass wrote")]
    Unlogged {
        /// Probe pages reported dirty.
        logged: usize,
        /// Pages written.
        written: usize,
    },
}

/// What the probe measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultProbe {
    /// The write-protection fault: (fastest protected pass − fastest writable pass)
    /// ÷ pages, ns; 0 when the protected pass was not slower (a host where logging a
    /// write costs nothing measurable).
    pub fault_ns: u64,
    /// Fastest pass over the re-protected pages (every write faults), ns.
    pub protected_pass_ns: u64,
    /// Fastest pass over the same pages left writable (no fault), ns.
    pub writable_pass_ns: u64,
    /// Pages written per pass.
    pub pages: usize,
    /// Timed rounds.
    pub rounds: usize,
    /// Probe pages the dirty log reported after every protected pass (the fewest
    /// over the rounds): `pages` when KVM saw every write.
    pub logged: usize,
    /// The whole probe, VM creation included.
    pub took: Duration,
}

/// Measures the write-protection fault on this host with a probe VM (see the module
/// documentation): [`PROBE_ROUNDS`] rounds of [`PROBE_PAGES`] pages.
pub fn measure(kvm: &Kvm) -> Result<FaultProbe, FaultProbeError> {
    measure_with(kvm, PROBE_PAGES, PROBE_ROUNDS)
}

/// The fault cost the hot-page policy takes from the probe, ns: [`measure`]d on the
/// first call in this process (the first run with checkpoints; a standby measures
/// before it may take over), the same figure after. `None`, after a warning in the
/// log, when the probe failed. A probe that found no measurable cost gives 1 ns.
pub fn host_fault_ns(kvm: &Kvm) -> Option<u64> {
    static MEASURED: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *MEASURED.get_or_init(|| match measure(kvm) {
        Ok(p) => {
            tracing::info!(
                "fault probe: a write-protection fault costs {} ns ({} pages, fastest of {} rounds: {} µs re-protected, {} µs writable; the probe took {:.1} ms)",
                p.fault_ns,
                p.pages,
                p.rounds,
                p.protected_pass_ns / 1000,
                p.writable_pass_ns / 1000,
                p.took.as_secs_f64() * 1e3
            );
            Some(p.fault_ns.max(1))
        }
        Err(e) => {
            tracing::warn!(
                "fault probe failed, assuming {} ns a write-protection fault: {e}",
                dirty::DEFAULT_FAULT_NS
            );
            None
        }
    })
}

/// Runs the probe now, unless `MIRRORVM_FAULT_US` replaces it, so that a later
/// [`host_fault_ns`] in this process finds the figure ready: a standby calls it at
/// start-up, so that taking over (a checkpointed run) does not wait for the probe.
pub fn measure_ahead(kvm: &Kvm) {
    if std::env::var_os("MIRRORVM_FAULT_US").is_none() {
        let _ = host_fault_ns(kvm);
    }
}

/// [`measure`] with `pages` pages per pass (1 to 64) and `rounds` rounds (at least 1).
pub fn measure_with(kvm: &Kvm, pages: usize, rounds: usize) -> Result<FaultProbe, FaultProbeError> {
    let start = Instant::now();
    let pages = pages.clamp(1, 64);
    let rounds = rounds.max(1);
    crate::vcpu::install_kick_handler()
        .map_err(|e| FaultProbeError::Exit(format!("kick handler: {e}")))?;
    let kvm_err = |what| move |source| FaultProbeError::Kvm { what, source };
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .map_err(|e| FaultProbeError::Memory(e.to_string()))?;
    write_guest(&mem)?;
    crate::memory::register(&vm, &mem, true).map_err(|e| FaultProbeError::Memory(e.to_string()))?;
    dirty::enable_manual_protect(&vm)?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(&long_mode_cpuid()?)
        .map_err(kvm_err("KVM_SET_CPUID2"))?;
    set_user_mode(&vcpu)?;
    vcpu.set_regs(&kvm_regs {
        rip: CODE,
        r8: DATA,
        r9: pages as u64,
        rbx: EXIT_ADDR,
        rax: u64::from(MARK),
        rflags: 0x2,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_SET_REGS"))?;

    let probe_set = probe_pages(&mem, pages);
    let passes = u32::try_from(1 + 2 * rounds).unwrap_or(u32::MAX);
    let (best_protected, best_writable, logged) = with_watchdog(
        &mut vcpu,
        RUN_DEADLINE.saturating_mul(passes),
        |vcpu| -> Result<_, FaultProbeError> {
            // Warm-up: host pages, KVM's mappings, the code page.
            pass(vcpu)?;
            let mut best_protected = u64::MAX;
            let mut best_writable = u64::MAX;
            let mut logged = pages;
            for _ in 0..rounds {
                // Every probe page's bit is set (written since its last clear):
                // clearing re-protects them all.
                dirty::clear(&vm, &mem, &probe_set)?;
                best_protected = best_protected.min(pass(vcpu)?);
                let seen = dirty::read(&vm, &mem)?;
                logged = logged.min(count_probe_pages(&seen, pages));
                best_writable = best_writable.min(pass(vcpu)?);
            }
            Ok((best_protected, best_writable, logged))
        },
    )??;
    if logged < pages {
        return Err(FaultProbeError::Unlogged {
            logged,
            written: pages,
        });
    }
    let fault_ns = best_protected.saturating_sub(best_writable) / pages as u64;
    Ok(FaultProbe {
        fault_ns,
        protected_pass_ns: best_protected,
        writable_pass_ns: best_writable,
        pages,
        rounds,
        logged,
        took: start.elapsed(),
    })
}

/// Page tables (identity map of the first 2 MiB, user pages) and the code.
fn write_guest(mem: &GuestMemory) -> Result<(), FaultProbeError> {
    let w = |what, addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| FaultProbeError::GuestWrite { what, source })
    };
    w("PML4", PML4, PDPT | PTE_UPPER)?;
    w("PDPT", PDPT, PD | PTE_UPPER)?;
    w("page directory", PD, PT | PTE_UPPER)?;
    for i in 0..512u64 {
        w("page table", PT + 8 * i, (i * PAGE_SIZE as u64) | PTE_LEAF)?;
    }
    mem.write_slice(&PROBE_CODE, GuestAddress(CODE))
        .map_err(|source| FaultProbeError::GuestWrite {
            what: "code",
            source,
        })
}

/// The least CPUID that lets KVM accept long mode (`EFER.LME` needs the LM bit):
/// the extended leaves up to 0x8000_0001 and the LM bit. Cheaper than asking KVM
/// for every leaf it supports; the probe code needs nothing else.
fn long_mode_cpuid() -> Result<CpuId, FaultProbeError> {
    let leaf = |function, eax, edx| kvm_cpuid_entry2 {
        function,
        eax,
        edx,
        ..Default::default()
    };
    CpuId::from_entries(&[
        leaf(0x8000_0000, 0x8000_0001, 0),
        leaf(0x8000_0001, 0, 1 << 29),
    ])
    .map_err(|_| FaultProbeError::Exit("cannot build the probe's CPUID".into()))
}

/// 64-bit long mode with paging, CPL3: user code (L=1) and data segments.
fn set_user_mode(vcpu: &VcpuFd) -> Result<(), FaultProbeError> {
    let mut sregs = vcpu.get_sregs().map_err(|source| FaultProbeError::Kvm {
        what: "KVM_GET_SREGS",
        source,
    })?;
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    // Selectors as a flat GDT would have them: user data 0x23, user code 0x2b.
    let data = seg(0x23, 0x3, 0, 1);
    sregs.cs = seg(0x2b, 0xb, 1, 0);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    crate::boot::long_mode_paging(&mut sregs, PML4);
    vcpu.set_sregs(&sregs)
        .map_err(|source| FaultProbeError::Kvm {
            what: "KVM_SET_SREGS",
            source,
        })
}

/// The probe pages as a dirty set of the probe's memory.
fn probe_pages(mem: &GuestMemory, pages: usize) -> DirtySet {
    let words = MEM_SIZE / PAGE_SIZE / 64;
    let mut bits = vec![0u64; words];
    let first = crate::arch::to_usize(DATA) / PAGE_SIZE;
    for p in first..first + pages {
        if let Some(w) = bits.get_mut(p / 64) {
            *w |= 1 << (p % 64);
        }
    }
    debug_assert_eq!(vm_memory::GuestMemoryBackend::num_regions(mem), 1);
    DirtySet {
        regions: vec![(0, bits)],
    }
}

/// How many of the probe pages `set` holds.
fn count_probe_pages(set: &DirtySet, pages: usize) -> usize {
    let first = DATA;
    let end = DATA + (pages * PAGE_SIZE) as u64;
    set.pages().filter(|a| (first..end).contains(a)).count()
}

/// One pass of the probe code, timed from entering `KVM_RUN` to its MMIO exit, ns.
fn pass(vcpu: &mut VcpuFd) -> Result<u64, FaultProbeError> {
    let t = Instant::now();
    let exit = vcpu.run();
    let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    match exit {
        Ok(VcpuExit::MmioWrite(EXIT_ADDR, _)) => Ok(ns),
        Ok(other) => Err(FaultProbeError::Exit(format!("{other:?}"))),
        Err(e) if e.errno() == libc::EINTR => Err(FaultProbeError::Stuck(RUN_DEADLINE)),
        Err(source) => Err(FaultProbeError::Kvm {
            what: "KVM_RUN",
            source,
        }),
    }
}

/// A `kvm_run` page pointer the watchdog thread may write `immediate_exit` through.
struct RunPage(*mut kvm_bindings::kvm_run);
// SAFETY: the page is KVM's shared mapping of the vCPU; the watchdog only stores one
// byte to it while `with_watchdog` keeps the vCPU (and so the mapping) alive.
unsafe impl Send for RunPage {}

/// Runs `f` on `vcpu` with a watchdog: unless `f` returns within `deadline`, the
/// watchdog sets `immediate_exit` and kicks this thread out of `KVM_RUN` (every
/// 10 ms) until `f` returns.
fn with_watchdog<T>(
    vcpu: &mut VcpuFd,
    deadline: Duration,
    f: impl FnOnce(&mut VcpuFd) -> T,
) -> Result<T, FaultProbeError> {
    let page = RunPage(vcpu.get_kvm_run());
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::Builder::new()
        .name("fault-probe-watchdog".into())
        .spawn(move || {
            let page = page;
            if done_rx.recv_timeout(deadline) != Err(mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            // SAFETY: the vCPU is alive until `with_watchdog` has joined this thread;
            // taking a field's address makes no reference.
            let exit = unsafe { std::ptr::addr_of_mut!((*page.0).immediate_exit) };
            // SAFETY: `exit` points into the live kvm_run page; a volatile byte store.
            unsafe { exit.write_volatile(1) };
            loop {
                // SAFETY: `me` is the thread running `f`, alive until it sends on
                // (or drops) `done_tx`, which this loop waits for.
                unsafe { libc::pthread_kill(me, crate::vcpu::kick_signal()) };
                if done_rx.recv_timeout(Duration::from_millis(10))
                    != Err(mpsc::RecvTimeoutError::Timeout)
                {
                    return;
                }
            }
        })
        .map_err(FaultProbeError::Watchdog)?;
    let out = f(vcpu);
    drop(done_tx);
    let _ = watchdog.join();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_what_its_comment_says() {
        // The jumps land where the comment says: jnz to offset 6, jmp to 0.
        assert_eq!(PROBE_CODE[18], 0x75);
        assert_eq!(20 + i32::from(i8::from_le_bytes([PROBE_CODE[19]])), 6);
        assert_eq!(PROBE_CODE[22], 0xeb);
        assert_eq!(24 + i32::from(i8::from_le_bytes([PROBE_CODE[23]])), 0);
    }

    #[test]
    fn the_probe_set_holds_exactly_the_probe_pages() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let set = probe_pages(&mem, 40);
        assert_eq!(set.count(), 40);
        assert_eq!(count_probe_pages(&set, 40), 40);
        assert_eq!(set.pages().next(), Some(DATA));
        assert!(EXIT_ADDR >= MEM_SIZE as u64);
    }
}
