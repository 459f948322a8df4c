//! Dirty ring against dirty bitmap: what one harvest costs, side by side in one run.
//!
//!     cargo bench --bench dirty_ring
//!
//! Two VMs of the same size, each with one vCPU running a few bytes of flat 32-bit
//! code that writes one byte into each of N consecutive pages and halts:
//! - **bitmap**: dirty logging with manual re-protection (what mirrorvm uses); a
//!   harvest is `KVM_GET_DIRTY_LOG` plus `KVM_CLEAR_DIRTY_LOG` of every page it
//!   reported (`vmm::dirty::read` and `vmm::dirty::clear`);
//! - **ring**: `KVM_CAP_DIRTY_LOG_RING` (64 Ki entries); a harvest reads the vCPU's
//!   ring entries, marks them collected and calls `KVM_RESET_DIRTY_RINGS`, which
//!   re-protects every page collected.
//!
//! Per memory size and N, the median harvest time of 15 rounds is printed, with the
//! pages each harvest found. The guest code runs at CPL0, which this host emulates,
//! so the writes go through KVM's emulator and mark pages dirty without a fault: the
//! guest's run time is not a fault measurement (the epoch benchmark measures that)
//! and is not printed.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_enable_cap, kvm_regs, KVM_CAP_DIRTY_LOG_RING};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x1000;
const DATA: u64 = 1 << 20;
const RING_ENTRIES: usize = 1 << 16;
/// struct kvm_dirty_gfn: flags, slot, offset.
const GFN_BYTES: usize = 16;
const GFN_F_DIRTY: u32 = 1;
const GFN_F_RESET: u32 = 2;
/// _IO(KVMIO, 0xc7)
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xAEC7;

fn fail(msg: &str) -> ! {
    eprintln!("dirty-ring benchmark: {msg}");
    std::process::exit(1);
}

/// Flat 32-bit protected mode, no paging; the loop `mov [edi], al; add edi, 4096;
/// dec ecx; jnz loop; hlt`.
fn setup(vm: &VmFd, mem: &vmm::memory::GuestMemory) -> VcpuFd {
    let code: [u8; 12] = [
        0x88, 0x07, // mov [edi], al
        0x81, 0xC7, 0x00, 0x10, 0x00, 0x00, // add edi, 0x1000
        0x49, // dec ecx
        0x75, 0xF5, // jnz -11
        0xF4, // hlt
    ];
    mem.write_slice(&code, GuestAddress(CODE))
        .unwrap_or_else(|e| fail(&format!("code: {e}")));
    let vcpu = vm
        .create_vcpu(0)
        .unwrap_or_else(|e| fail(&format!("vcpu: {e}")));
    let mut sregs = vcpu
        .get_sregs()
        .unwrap_or_else(|e| fail(&format!("sregs: {e}")));
    for s in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        s.base = 0;
        s.limit = 0xffff_ffff;
        s.g = 1;
        s.db = 1;
        s.s = 1;
        s.present = 1;
        s.dpl = 0;
        s.type_ = 3;
        s.selector = 0x10;
    }
    sregs.cs.type_ = 0xb;
    sregs.cs.selector = 0x8;
    sregs.cr0 |= 1;
    vcpu.set_sregs(&sregs)
        .unwrap_or_else(|e| fail(&format!("set_sregs: {e}")));
    vcpu
}

fn write_pages(vcpu: &mut VcpuFd, n: u64) {
    if n == 0 {
        return;
    }
    let regs = kvm_regs {
        rip: CODE,
        rdi: DATA,
        rcx: n,
        rax: 0x5a,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .unwrap_or_else(|e| fail(&format!("set_regs: {e}")));
    match vcpu.run() {
        Ok(VcpuExit::Hlt) => {}
        other => fail(&format!("guest ended with {other:?}, not hlt")),
    }
}

struct Ring {
    base: *mut u8,
    next: usize,
}

impl Ring {
    fn map(vcpu: &VcpuFd) -> Ring {
        // SAFETY: maps the vCPU's dirty ring (RING_ENTRIES * GFN_BYTES bytes at
        // page offset KVM_DIRTY_LOG_PAGE_OFFSET of the vCPU fd, as KVM documents),
        // shared, at an address the kernel picks; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RING_ENTRIES * GFN_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                libc::off_t::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * 4096,
            )
        };
        if p == libc::MAP_FAILED {
            fail(&format!(
                "mmap the dirty ring: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ring {
            base: p.cast(),
            next: 0,
        }
    }

    /// Collects every published entry, marks it for reset, and resets the rings.
    fn harvest(&mut self, vm: &VmFd) -> usize {
        let mut n = 0;
        loop {
            let i = self.next % RING_ENTRIES;
            // SAFETY: entry `i` lies inside the mapping (i < RING_ENTRIES), which
            // lives as long as the VM's vCPU; the pointer stays in bounds.
            let entry = unsafe { self.base.add(i * GFN_BYTES) };
            // SAFETY: the entry's first field is its u32 flags word, 4-byte aligned
            // (page-aligned mapping, 16-byte entries), inside the live mapping.
            let flags = unsafe { &*entry.cast::<std::sync::atomic::AtomicU32>() };
            // Shared with KVM: accessed atomically, acquire/release, as the
            // dirty-ring protocol asks.
            if flags.load(std::sync::atomic::Ordering::Acquire) & GFN_F_DIRTY == 0 {
                break;
            }
            flags.store(GFN_F_RESET, std::sync::atomic::Ordering::Release);
            self.next += 1;
            n += 1;
        }
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; `vm` is a VM fd.
        let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS, 0) };
        if r < 0 {
            fail(&format!(
                "KVM_RESET_DIRTY_RINGS: {}",
                std::io::Error::last_os_error()
            ));
        }
        n
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("*** SKIPPED dirty-ring benchmark: /dev/kvm is unusable ***");
        return;
    };
    let ring_max = kvm.check_extension_int(kvm_ioctls::Cap::DirtyLogRing);
    if ring_max <= 0 {
        eprintln!("*** SKIPPED dirty-ring benchmark: KVM has no dirty ring ***");
        return;
    }
    let ring_bytes = (RING_ENTRIES * GFN_BYTES).min(usize::try_from(ring_max).unwrap_or(0));
    if ring_bytes < RING_ENTRIES * GFN_BYTES {
        fail(&format!(
            "the dirty ring holds at most {ring_max} bytes here"
        ));
    }
    println!("mirrorvm dirty-ring benchmark: one vCPU, harvest time, median of 15 rounds");
    println!(
        "host: {} cores, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!();
    println!("| memory | pages written | bitmap: GET + CLEAR (µs) | pages found | ring: collect + reset (µs) | pages found |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for mib in [256u64, 1024] {
        let size = mib << 20;
        // The bitmap VM, with manual re-protection.
        let bvm = kvm
            .create_vm()
            .unwrap_or_else(|e| fail(&format!("vm: {e}")));
        let bmem = vmm::memory::create(size).unwrap_or_else(|e| fail(&format!("memory: {e}")));
        vmm::memory::register(&bvm, &bmem, true).unwrap_or_else(|e| fail(&format!("slot: {e}")));
        vmm::dirty::enable_manual_protect(&bvm).unwrap_or_else(|e| fail(&format!("{e}")));
        let mut bcpu = setup(&bvm, &bmem);
        // The ring VM: the ring must be enabled before the vCPU exists.
        let rvm = kvm
            .create_vm()
            .unwrap_or_else(|e| fail(&format!("vm: {e}")));
        let cap = kvm_enable_cap {
            cap: KVM_CAP_DIRTY_LOG_RING,
            args: [ring_bytes as u64, 0, 0, 0],
            ..Default::default()
        };
        rvm.enable_cap(&cap)
            .unwrap_or_else(|e| fail(&format!("enable the dirty ring: {e}")));
        let rmem = vmm::memory::create(size).unwrap_or_else(|e| fail(&format!("memory: {e}")));
        vmm::memory::register(&rvm, &rmem, true).unwrap_or_else(|e| fail(&format!("slot: {e}")));
        let mut rcpu = setup(&rvm, &rmem);
        let mut ring = Ring::map(&rcpu);
        // Settle both: the code page and first touches.
        write_pages(&mut bcpu, 16_000);
        write_pages(&mut rcpu, 16_000);
        let set = vmm::dirty::read(&bvm, &bmem).unwrap_or_else(|e| fail(&format!("{e}")));
        vmm::dirty::clear(&bvm, &bmem, &set).unwrap_or_else(|e| fail(&format!("{e}")));
        ring.harvest(&rvm);
        for n in [0u64, 1_000, 4_000, 16_000] {
            let (mut bt, mut rt) = (Vec::new(), Vec::new());
            let (mut bn, mut rn) = (0, 0);
            for _ in 0..15 {
                write_pages(&mut bcpu, n);
                let t = Instant::now();
                let set = vmm::dirty::read(&bvm, &bmem).unwrap_or_else(|e| fail(&format!("{e}")));
                vmm::dirty::clear(&bvm, &bmem, &set).unwrap_or_else(|e| fail(&format!("{e}")));
                bt.push(t.elapsed());
                bn = set.count();
                write_pages(&mut rcpu, n);
                let t = Instant::now();
                rn = ring.harvest(&rvm);
                rt.push(t.elapsed());
            }
            println!(
                "| {mib} MiB | {n} | {:.1} | {bn} | {:.1} | {rn} |",
                median(bt).as_secs_f64() * 1e6,
                median(rt).as_secs_f64() * 1e6
            );
        }
    }
}
