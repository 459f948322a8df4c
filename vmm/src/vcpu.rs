//! vCPUs: their boot configuration (CPUID, MSRs, FPU, LAPIC, registers) and the
//! KVM_RUN loop each one runs on its own thread.
//!
//! # Kicking a vCPU out of KVM_RUN
//!
//! Another thread sets the vCPU's `stop` flag, then sends it [`kick_signal`]. The
//! handler sets `immediate_exit` in the vCPU's `kvm_run` page, so KVM_RUN returns
//! EINTR whether the signal lands inside the ioctl or just before it; a PIO/MMIO exit
//! still pending is completed by KVM first without running guest code. The loop
//! checks `stop` after every exit. Some guest instructions make KVM spin inside
//! KVM_RUN where no signal reaches it (ENVIRONMENT.md: `vmcall` under kvm_pvm); the
//! caller therefore waits for the thread with a deadline and reports a stuck vCPU
//! instead of hanging.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::bus::Bus;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_run, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;

use crate::boot;

/// Failures while configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// The ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Building the MSR list failed.
    #[error("vCPU {0}: cannot build the boot MSR list")]
    MsrList(u8),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// Why a vCPU stopped running guest code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// Its `stop` flag was set (the run is ending for another reason).
    Requested,
    /// The guest did something that ends the run; the text says what, with RIP.
    GuestError(String),
}

/// Offset of the kick signal from SIGRTMIN.
const KICK_SIGNAL_OFFSET: i32 = 0;

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick handler; null on non-vCPU threads.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer was set by this very thread from its own VcpuFd's
            // kvm_run mapping, which lives as long as the VcpuFd, and it is reset to
            // null before the VcpuFd is dropped. A volatile byte store is
            // async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
    std::sync::atomic::fence(Ordering::Release);
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
                .map_err(|e| e.errno())
        })
        .map_err(|e| VcpuError::Signal(vmm_sys_util::errno::Error::new(e)))
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSR values at reset that the kernel expects us to set.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, 1),          // fast strings
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, write-back default
    ]
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

fn set_lvt_mode(regs: &mut [libc::c_char], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as libc::c_char;
    }
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

impl Vcpu {
    /// Wraps a KVM vCPU with the buses its exits go to.
    pub fn new(index: u8, fd: VcpuFd, pio: Arc<Bus>, mmio: Arc<Bus>) -> Self {
        Vcpu {
            index,
            fd,
            pio,
            mmio,
        }
    }

    /// The vCPU's index (also its APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU, for state save and restore.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn kvm<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
        r.map_err(|source| VcpuError::Kvm {
            index: self.index,
            what,
            source,
        })
    }

    /// Configures CPUID, MSRs, FPU and LAPIC; on the boot vCPU also the long-mode
    /// registers at `entry`.
    ///
    /// Ordering: CPUID must be set before the first KVM_RUN (KVM refuses it after);
    /// the LAPIC is read, adjusted and written back after CPUID so that the x2APIC
    /// feature bit KVM derived from CPUID is in place.
    pub fn configure(&self, cpuid: &CpuId, entry: Option<GuestAddress>) -> Result<(), VcpuError> {
        self.kvm("KVM_SET_CPUID2", self.fd.set_cpuid2(cpuid))?;

        let msrs = Msrs::from_entries(&boot_msrs()).map_err(|_| VcpuError::MsrList(self.index))?;
        let set = self.kvm("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        if set != msrs.as_slice().len() {
            let failed = msrs.as_slice()[set].index;
            tracing::warn!(
                "vCPU {}: KVM accepted {set} of {} boot MSRs (first refused: {failed:#x})",
                self.index,
                msrs.as_slice().len()
            );
        }

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.kvm("KVM_SET_FPU", self.fd.set_fpu(&fpu))?;

        let mut lapic = self.kvm("KVM_GET_LAPIC", self.fd.get_lapic())?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
        self.kvm("KVM_SET_LAPIC", self.fd.set_lapic(&lapic))?;

        if let Some(entry) = entry {
            let mut sregs = self.kvm("KVM_GET_SREGS", self.fd.get_sregs())?;
            boot::setup_long_mode_sregs(&mut sregs);
            self.kvm("KVM_SET_SREGS", self.fd.set_sregs(&sregs))?;
            self.kvm("KVM_SET_REGS", self.fd.set_regs(&boot::boot_regs(entry)))?;
        }
        Ok(())
    }

    /// Runs guest code until `stop` is set or the guest ends the run.
    ///
    /// Must be called on the thread that will be kicked (it registers this vCPU's
    /// `kvm_run` page for the kick handler).
    pub fn run(&mut self, stop: &AtomicBool) -> VcpuStop {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        let result = self.run_loop(stop);
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        result
    }

    fn run_loop(&mut self, stop: &AtomicBool) -> VcpuStop {
        loop {
            if stop.load(Ordering::Acquire) {
                return VcpuStop::Requested;
            }
            let outcome = match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        if !self.pio.read(u64::from(port), data) {
                            data.fill(0xff);
                        }
                        None
                    }
                    VcpuExit::IoOut(port, data) => {
                        self.pio.write(u64::from(port), data);
                        None
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        if !self.mmio.read(addr, data) {
                            data.fill(0xff);
                        }
                        None
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        self.mmio.write(addr, data);
                        None
                    }
                    VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
                    VcpuExit::Shutdown => Some("the guest shut down (KVM_EXIT_SHUTDOWN: triple fault)".to_string()),
                    VcpuExit::InternalError => Some(self.describe_internal_error()),
                    VcpuExit::FailEntry(reason, cpu) => Some(format!(
                        "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, cpu {cpu})"
                    )),
                    VcpuExit::SystemEvent(kind, _) => Some(format!("the guest raised system event {kind} (KVM_EXIT_SYSTEM_EVENT)")),
                    other => Some(format!("unexpected KVM exit {other:?}")),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(format!("KVM_RUN failed: {e}")),
            };
            if let Some(reason) = outcome {
                let rip = self
                    .fd
                    .get_regs()
                    .map(|r| format!("{:#x}", r.rip))
                    .unwrap_or_else(|_| "unknown".into());
                return VcpuStop::GuestError(format!("vCPU {}: {reason} at RIP {rip}", self.index));
            }
        }
    }

    fn describe_internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, which tells us the kernel
        // filled the `internal` member of the union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            1 => {
                "emulation failure: the instruction emulator cannot execute the guest's instruction"
            }
            2 => "simultaneous exceptions",
            3 => "delivery event failure",
            4 => "unexpected exit",
            _ => "unknown suberror",
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..n];
        // With KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, data[0] is the
        // flags word, then one byte of length and up to 15 instruction bytes.
        if internal.suberror == 1 && n >= 3 && data[0] & 1 == 1 {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&data[1].to_le_bytes());
            raw[8..].copy_from_slice(&data[2].to_le_bytes());
            let len = usize::from(raw[0]).min(15);
            let bytes: Vec<String> = raw[1..1 + len].iter().map(|b| format!("{b:02x}")).collect();
            return format!(
                "KVM_EXIT_INTERNAL_ERROR (suberror 1: {what}; instruction bytes {})",
                bytes.join(" ")
            );
        }
        format!(
            "KVM_EXIT_INTERNAL_ERROR (suberror {}: {what}; data {data:x?})",
            internal.suberror
        )
    }
}
