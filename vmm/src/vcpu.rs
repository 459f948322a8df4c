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

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devices::bus::{lock_recover, Bus};
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
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
    /// An MSR in the save list could not be read.
    #[error("vCPU {index}: MSR {msr:#x} could not be read")]
    MsrRead {
        /// vCPU index.
        index: u8,
        /// The MSR.
        msr: u32,
    },
    /// A saved MSR was refused on restore.
    #[error("vCPU {index}: KVM refused to restore MSR {msr:#x}")]
    MsrWrite {
        /// vCPU index.
        index: u8,
        /// The MSR.
        msr: u32,
    },
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
            // The pointer was set by this very thread from its own VcpuFd's kvm_run
            // mapping, and is reset to null before that VcpuFd can be dropped.
            // SAFETY: `run` points at a live kvm_run; taking a field's address makes
            // no reference.
            let exit = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
            // SAFETY: `exit` points into that live kvm_run; a volatile byte store is
            // async-signal-safe.
            unsafe { exit.write_volatile(1) };
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
        *b = regs[offset + i].to_ne_bytes()[0];
    }
    let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = libc::c_char::from_ne_bytes([*b]);
    }
}

/// Rounds of KVM_RUN with immediate_exit allowed to finish a pending exit.
const PENDING_EXIT_ROUNDS: usize = 64;

/// A KVM exit that ends the run.
enum ExitProblem {
    /// KVM_EXIT_INTERNAL_ERROR: described from the kvm_run page.
    Internal,
    /// Anything else, already described.
    Other(String),
}

/// Serves one KVM exit: PIO and MMIO go to the buses (unclaimed reads return all
/// ones); exits that end the run are returned as problems.
fn dispatch(pio: &Bus, mmio: &Bus, exit: VcpuExit) -> Result<(), ExitProblem> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Shutdown => {
            return Err(ExitProblem::Other(
                "the guest shut down (KVM_EXIT_SHUTDOWN: triple fault)".into(),
            ))
        }
        VcpuExit::InternalError => return Err(ExitProblem::Internal),
        VcpuExit::FailEntry(reason, cpu) => {
            return Err(ExitProblem::Other(format!(
                "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, cpu {cpu})"
            )))
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Err(ExitProblem::Other(format!(
                "the guest raised system event {kind} (KVM_EXIT_SYSTEM_EVENT)"
            )))
        }
        other => return Err(ExitProblem::Other(format!("unexpected KVM exit {other:?}"))),
    }
    Ok(())
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    msr_list: Arc<Vec<u32>>,
    /// What a save reads only once: the CPUID table and the TSC frequency, which
    /// nothing changes once the vCPU has run (KVM refuses a different CPUID then,
    /// and the VMM sets the TSC frequency only on restore, before the first run).
    constant: RefCell<Option<Constant>>,
    /// Whether the registers KVM copies into the `kvm_run` page at every return
    /// from KVM_RUN (`KVM_CAP_SYNC_REGS`) are the vCPU's current ones: true after
    /// KVM_RUN returned, false after the VMM set registers itself.
    synced: Cell<bool>,
    /// Whether that copy may stand in for KVM_GET_REGS and KVM_GET_SREGS: `None`
    /// until the first save compares the two, then what the comparison found.
    sync_trusted: Cell<Option<bool>>,
}

/// The part of a vCPU's state that does not change while it runs.
#[derive(Clone)]
struct Constant {
    cpuid: CpuId,
    tsc_khz: Option<u32>,
}

impl Vcpu {
    /// Wraps a KVM vCPU with the buses its exits go to.
    pub fn new(index: u8, fd: VcpuFd, pio: Arc<Bus>, mmio: Arc<Bus>) -> Self {
        Vcpu {
            index,
            fd,
            pio,
            mmio,
            msr_list: Arc::new(Vec::new()),
            constant: RefCell::new(None),
            synced: Cell::new(false),
            sync_trusted: Cell::new(None),
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
            self.synced.set(false);
            self.kvm("KVM_SET_SREGS", self.fd.set_sregs(&sregs))?;
            self.kvm("KVM_SET_REGS", self.fd.set_regs(&boot::boot_regs(entry)))?;
        }
        Ok(())
    }

    /// Runs guest code until the control asks it to stop or the guest ends the run;
    /// parks (and serves state requests) whenever the control asks for a pause.
    ///
    /// Must be called on the thread that will be kicked (it registers this vCPU's
    /// `kvm_run` page for the kick handler and its thread id with `control`).
    pub fn run(&mut self, control: &VcpuControl) -> VcpuStop {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        // KVM copies the registers into the `kvm_run` page on its way out of every
        // KVM_RUN (EINTR included), so a save at a cut needs two ioctls fewer. A
        // kernel without the capability leaves the page as it is: the first save
        // compares, and falls back to the ioctls for good.
        self.fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        self.fd
            .set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        control.set_thread(nix::sys::pthread::pthread_self());
        let result = self.run_loop(control);
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        control.exited();
        result
    }

    fn run_loop(&mut self, control: &VcpuControl) -> VcpuStop {
        // Whether the last KVM_RUN returned an exit that the next KVM_RUN completes
        // (KVM finishes a PIO/MMIO instruction at the start of the following
        // KVM_RUN). After EINTR nothing is pending: KVM completes a pending exit
        // before it looks at immediate_exit or signals.
        let mut pending = false;
        loop {
            if control.stop.load(Ordering::Acquire) {
                return VcpuStop::Requested;
            }
            if control.pause.load(Ordering::Acquire) {
                if !pending {
                    // Kicked out of KVM_RUN (EINTR): nothing to complete, park at
                    // once. This saves one KVM_RUN round per pause. (A kick that
                    // landed after the EINTR left immediate_exit set: clear it.)
                    self.fd.set_kvm_immediate_exit(0);
                    if control.park(self) {
                        return VcpuStop::Requested;
                    }
                    continue;
                }
                // Complete a PIO/MMIO exit still pending in KVM: with immediate_exit
                // set, KVM_RUN finishes the instruction and returns EINTR without
                // running guest code, so the registers saved at the cut are whole. A
                // string instruction may need more than one round (KVM then returns
                // the next exit instead of EINTR); a bounded number of rounds.
                let mut completed = false;
                for _ in 0..PENDING_EXIT_ROUNDS {
                    self.fd.set_kvm_immediate_exit(1);
                    let r = self.fd.run();
                    self.synced.set(true);
                    let done = match r {
                        Err(_) => true,
                        Ok(exit) => {
                            if let Err(reason) = dispatch(&self.pio, &self.mmio, exit) {
                                self.fd.set_kvm_immediate_exit(0);
                                return self.guest_error(reason);
                            }
                            false
                        }
                    };
                    if done {
                        completed = true;
                        break;
                    }
                }
                self.fd.set_kvm_immediate_exit(0);
                if !completed {
                    // Still inside a long string instruction: parking now would save
                    // registers in the middle of it. Go round again (the stop flag
                    // and the pauser's deadline still apply).
                    continue;
                }
                pending = false;
                if control.park(self) {
                    return VcpuStop::Requested;
                }
                continue;
            }
            let r = self.fd.run();
            self.synced.set(true);
            let outcome = match r {
                Ok(exit) => {
                    pending = true;
                    dispatch(&self.pio, &self.mmio, exit).err()
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    pending = false;
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(ExitProblem::Other(format!("KVM_RUN failed: {e}"))),
            };
            if let Some(reason) = outcome {
                return self.guest_error(reason);
            }
        }
    }

    fn guest_error(&mut self, reason: ExitProblem) -> VcpuStop {
        let reason = match reason {
            ExitProblem::Internal => self.describe_internal_error(),
            ExitProblem::Other(r) => r,
        };
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|_| "unknown".into());
        VcpuStop::GuestError(format!("vCPU {}: {reason} at RIP {rip}", self.index))
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

/// A request a parked vCPU thread serves.
enum Request {
    /// Save the vCPU's state; `sole`: no other vCPU can have sent it an INIT or SIPI
    /// since it left KVM_RUN (see [`Vcpu::save_state`]).
    Save { sole: bool },
}

#[derive(Default)]
struct Parking {
    parked: bool,
    exited: bool,
    request: Option<Request>,
    saved: Option<Result<VcpuState, VcpuError>>,
}

/// How another thread steers a vCPU thread: pause (the thread completes any pending
/// exit and parks), save state while parked, resume, stop.
///
/// Protocol: the owner sets `pause`, kicks the thread, and waits until it reports
/// parked; while parked the thread serves [`VcpuControl::request_save`] requests on its own
/// thread (so the VcpuFd never leaves it); clearing `pause` lets it run again.
pub struct VcpuControl {
    index: u8,
    pause: AtomicBool,
    stop: AtomicBool,
    thread: Mutex<Option<libc::pthread_t>>,
    parking: Mutex<Parking>,
    cv: Condvar,
}

/// Failures of the pause protocol.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The vCPU did not park in time.
    #[error("vCPU {0} did not leave KVM_RUN within {1:?} of being kicked: the guest is stuck in an instruction KVM cannot interrupt (see ENVIRONMENT.md: vmcall under kvm_pvm)")]
    Stuck(u8, Duration),
    /// The vCPU thread has ended.
    #[error("vCPU {0} is no longer running")]
    Exited(u8),
    /// Saving the vCPU's state failed.
    #[error(transparent)]
    Save(#[from] VcpuError),
}

impl VcpuControl {
    /// A control for vCPU `index`, running.
    pub fn new(index: u8) -> Arc<Self> {
        Arc::new(VcpuControl {
            index,
            pause: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            parking: Mutex::new(Parking::default()),
            cv: Condvar::new(),
        })
    }

    fn set_thread(&self, t: libc::pthread_t) {
        *lock_recover(&self.thread) = Some(t);
    }

    fn exited(&self) {
        *lock_recover(&self.thread) = None;
        let mut p = lock_recover(&self.parking);
        p.exited = true;
        self.cv.notify_all();
    }

    /// Sends the kick signal to the vCPU thread, if it runs.
    pub fn kick(&self) {
        if let Some(t) = *lock_recover(&self.thread) {
            // SAFETY: `t` is the id of the live vCPU thread: it is cleared (under
            // the same lock) before the thread returns from `Vcpu::run`.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Asks the vCPU to stop for good and kicks it.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        {
            // Under the lock, so a vCPU about to wait in `park` cannot miss it.
            let _g = lock_recover(&self.parking);
            self.cv.notify_all();
        }
        self.kick();
    }

    /// Asks the vCPU to pause and kicks it; see [`VcpuControl::wait_parked`].
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::Release);
        self.kick();
    }

    /// Asks the vCPU to pause, and to save its state as soon as it has parked, and
    /// kicks it. The thread reports itself parked first and then saves, so the
    /// caller's work after [`VcpuControl::wait_parked`] (and every other vCPU's
    /// save) overlaps the save; [`VcpuControl::wait_saved`] collects it. A vCPU
    /// that is parked already (held by the user) saves at once. Only for a machine
    /// of one vCPU: with more, no vCPU may save before all have parked (an IPI
    /// from one still running would be lost), so they pause with
    /// [`VcpuControl::request_pause`] and save with [`VcpuControl::request_save`].
    pub fn request_pause_and_save(&self) {
        {
            let mut p = lock_recover(&self.parking);
            p.request = Some(Request::Save { sole: true });
            p.saved = None;
            self.pause.store(true, Ordering::Release);
            self.cv.notify_all();
        }
        self.kick();
    }

    /// Waits until the vCPU has parked, kicking again every millisecond (a signal
    /// that lands between the flag check and KVM_RUN is caught by immediate_exit,
    /// but a lost one costs nothing to resend).
    pub fn wait_parked(&self, deadline: Duration) -> Result<(), ControlError> {
        let start = Instant::now();
        let mut p = lock_recover(&self.parking);
        loop {
            if p.parked {
                return Ok(());
            }
            if p.exited {
                return Err(ControlError::Exited(self.index));
            }
            if start.elapsed() > deadline {
                return Err(ControlError::Stuck(self.index, deadline));
            }
            let (g, _) = self
                .cv
                .wait_timeout(p, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner());
            p = g;
            if !p.parked {
                drop(p);
                self.kick();
                p = lock_recover(&self.parking);
            }
        }
    }

    /// Asks the parked vCPU to save its state (see [`VcpuControl::wait_saved`]), so
    /// several vCPUs can save at once.
    pub fn request_save(&self) -> Result<(), ControlError> {
        let mut p = lock_recover(&self.parking);
        if !p.parked {
            return Err(ControlError::Exited(self.index));
        }
        p.request = Some(Request::Save { sole: false });
        p.saved = None;
        self.cv.notify_all();
        Ok(())
    }

    /// Waits for the state asked for by [`VcpuControl::request_save`].
    pub fn wait_saved(&self) -> Result<VcpuState, ControlError> {
        let mut p = lock_recover(&self.parking);
        loop {
            if let Some(r) = p.saved.take() {
                return r.map_err(ControlError::Save);
            }
            if p.exited {
                return Err(ControlError::Exited(self.index));
            }
            p = self.cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
        let _g = lock_recover(&self.parking);
        self.cv.notify_all();
    }

    /// Parks the calling vCPU thread until resumed; true if it must stop.
    fn park(&self, vcpu: &Vcpu) -> bool {
        let mut p = lock_recover(&self.parking);
        p.parked = true;
        self.cv.notify_all();
        loop {
            if self.stop.load(Ordering::Acquire) {
                p.parked = false;
                return true;
            }
            if let Some(Request::Save { sole }) = p.request.take() {
                drop(p);
                let r = vcpu.save_state(sole);
                p = lock_recover(&self.parking);
                p.saved = Some(r);
                self.cv.notify_all();
                continue;
            }
            if !self.pause.load(Ordering::Acquire) {
                p.parked = false;
                return false;
            }
            p = self.cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Everything KVM holds for one vCPU, as saved at a cut.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table (restored first: KVM refuses it after the first KVM_RUN).
    pub cpuid: CpuId,
    /// TSC frequency in kHz, when KVM reports it.
    pub tsc_khz: Option<u32>,
    /// Every readable MSR, IA32_TSC first.
    pub msrs: Msrs,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Run state (running, halted, waiting for SIPI, …).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub vcpu_events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.as_slice().len())
            .field("mp_state", &self.mp_state.mp_state)
            .finish_non_exhaustive()
    }
}

/// The MSRs of KVM_GET_MSR_INDEX_LIST that this vCPU can read back, IA32_TSC first
/// (restoring the TSC before the TSC-deadline MSR keeps the deadline meaningful).
pub fn readable_msrs(kvm: &kvm_ioctls::Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    let Ok(list) = kvm.get_msr_index_list() else {
        return Vec::new();
    };
    let mut out = vec![MSR_IA32_TSC];
    for &index in list.as_slice() {
        if index == MSR_IA32_TSC {
            continue;
        }
        let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            out.push(index);
        }
    }
    out
}

impl Vcpu {
    /// Sets the MSRs to save at every cut (see [`readable_msrs`]).
    pub fn set_msr_list(&mut self, list: Arc<Vec<u32>>) {
        self.msr_list = list;
    }

    /// Reads this vCPU's whole state. Call only while it is not in KVM_RUN, and with
    /// several vCPUs only once none of them runs (an IPI sent after this save would
    /// be missing from it).
    ///
    /// Ordering: the pending exit was completed before parking (see `run_loop`);
    /// KVM_GET_MP_STATE comes first, because KVM applies an INIT or SIPI that
    /// another vCPU sent while this one was out of KVM_RUN when it is read (INIT
    /// resets the registers and the LAPIC, SIPI sets CS:RIP), and everything read
    /// after it must include that. `sole`: this is the machine's only vCPU, so no
    /// such INIT or SIPI can have come, and the registers may come from KVM's copy
    /// in `kvm_run`.
    pub fn save_state(&self, sole: bool) -> Result<VcpuState, VcpuError> {
        let mp_state = self.kvm("KVM_GET_MP_STATE", self.fd.get_mp_state())?;
        let constant = self.constant()?;
        let entries: Vec<kvm_msr_entry> = self
            .msr_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList(self.index))?;
        let n = self.kvm("KVM_GET_MSRS", self.fd.get_msrs(&mut msrs))?;
        if n != entries.len() {
            return Err(VcpuError::MsrRead {
                index: self.index,
                msr: entries[n].index,
            });
        }
        let (regs, sregs) = self.regs_and_sregs(sole)?;
        Ok(VcpuState {
            cpuid: constant.cpuid,
            tsc_khz: constant.tsc_khz,
            msrs,
            regs,
            sregs,
            xsave: self.kvm("KVM_GET_XSAVE", self.fd.get_xsave())?,
            xcrs: self.kvm("KVM_GET_XCRS", self.fd.get_xcrs())?,
            debugregs: self.kvm("KVM_GET_DEBUGREGS", self.fd.get_debug_regs())?,
            lapic: self.kvm("KVM_GET_LAPIC", self.fd.get_lapic())?,
            mp_state,
            vcpu_events: self.kvm("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events())?,
        })
    }

    /// The general and segment registers: from the copy KVM left in the `kvm_run`
    /// page when KVM_RUN last returned (they change only while the vCPU runs, or when
    /// an INIT or SIPI from another vCPU is applied, which `sole` rules out), once
    /// the first save has found that copy equal to what the ioctls return; from
    /// the ioctls otherwise. The vCPU events are always read by ioctl: an NMI
    /// another vCPU sends after this one left KVM_RUN shows only there.
    fn regs_and_sregs(&self, sole: bool) -> Result<(kvm_regs, kvm_sregs), VcpuError> {
        let by_ioctl = || -> Result<(kvm_regs, kvm_sregs), VcpuError> {
            Ok((
                self.kvm("KVM_GET_REGS", self.fd.get_regs())?,
                self.kvm("KVM_GET_SREGS", self.fd.get_sregs())?,
            ))
        };
        if !sole || !self.synced.get() || self.sync_trusted.get() == Some(false) {
            return by_ioctl();
        }
        let copy = self.fd.sync_regs();
        if self.sync_trusted.get() == Some(true) {
            return Ok((copy.regs, copy.sregs));
        }
        let read = by_ioctl()?;
        let same = copy.regs == read.0 && copy.sregs == read.1;
        if same {
            tracing::debug!(
                "vCPU {}: saves read the registers from KVM's copy in kvm_run",
                self.index
            );
        } else {
            tracing::info!(
                "vCPU {}: KVM's register copy in kvm_run differs from KVM_GET_REGS/SREGS; saving by ioctl",
                self.index
            );
        }
        self.sync_trusted.set(Some(same));
        Ok(read)
    }

    /// The CPUID table and TSC frequency: read from KVM at the first save, then
    /// from the copy kept (see `Vcpu::constant`).
    fn constant(&self) -> Result<Constant, VcpuError> {
        if let Some(c) = self.constant.borrow().as_ref() {
            return Ok(c.clone());
        }
        let c = Constant {
            cpuid: self.kvm("KVM_GET_CPUID2", self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?,
            tsc_khz: self.fd.get_tsc_khz().ok(),
        };
        *self.constant.borrow_mut() = Some(c.clone());
        Ok(c)
    }

    /// Loads a saved state into this (new, never run) vCPU.
    ///
    /// Ordering (each step depends on the ones before):
    /// 1. CPUID: KVM refuses it once the vCPU has run, and derives the LAPIC's
    ///    x2APIC support and the MSRs it accepts from it;
    /// 2. TSC frequency, before anything that reads the TSC;
    /// 3. MP state, then regs and sregs (sregs sets the APIC base MSR, which the
    ///    LAPIC restore depends on);
    /// 4. xsave and xcrs, debug registers;
    /// 5. LAPIC, then MSRs (the TSC-deadline MSR is only accepted with the LAPIC in
    ///    TSC-deadline mode; IA32_TSC comes first in the list);
    /// 6. vCPU events last, so pending injections are not cleared by the above.
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), VcpuError> {
        // The next save reads CPUID and the TSC frequency from KVM again.
        *self.constant.borrow_mut() = None;
        self.kvm("KVM_SET_CPUID2", self.fd.set_cpuid2(&s.cpuid))?;
        if let Some(khz) = s.tsc_khz {
            if let Err(e) = self.fd.set_tsc_khz(khz) {
                tracing::warn!("vCPU {}: cannot set the TSC to {khz} kHz: {e}", self.index);
            }
        }
        self.kvm("KVM_SET_MP_STATE", self.fd.set_mp_state(s.mp_state))?;
        self.synced.set(false);
        self.kvm("KVM_SET_REGS", self.fd.set_regs(&s.regs))?;
        self.kvm("KVM_SET_SREGS", self.fd.set_sregs(&s.sregs))?;
        // SAFETY: `s.xsave` is a complete kvm_xsave (the legacy 4 KiB layout, which
        // is what KVM_GET_XSAVE returned and what KVM_SET_XSAVE reads).
        self.kvm("KVM_SET_XSAVE", unsafe { self.fd.set_xsave(&s.xsave) })?;
        self.kvm("KVM_SET_XCRS", self.fd.set_xcrs(&s.xcrs))?;
        self.kvm("KVM_SET_DEBUGREGS", self.fd.set_debug_regs(&s.debugregs))?;
        self.kvm("KVM_SET_LAPIC", self.fd.set_lapic(&s.lapic))?;
        let n = self.kvm("KVM_SET_MSRS", self.fd.set_msrs(&s.msrs))?;
        if n != s.msrs.as_slice().len() {
            return Err(VcpuError::MsrWrite {
                index: self.index,
                msr: s.msrs.as_slice()[n].index,
            });
        }
        self.kvm(
            "KVM_SET_VCPU_EVENTS",
            self.fd.set_vcpu_events(&s.vcpu_events),
        )?;
        Ok(())
    }
}
