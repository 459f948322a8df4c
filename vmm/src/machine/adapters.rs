//! The machine as the epoch engine sees it: implementations of the engine's traits
//! over KVM, the devices, the disks' checkpoint stores and the console gate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock_recover;
use devices::legacy::I8042;
use devices::serial::SerialDevice;
use devices::snapshot::Snapshot;
use devices::store::SharedStore;
use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::DevicesState;
use crate::checkpoint::{DiskRegion, MachineState, RegionContent, StorageMode};
use crate::dirty::{self, DirtySet, HotConfig, HotPages, Protect, StagedPages};
use crate::epoch::{
    Cause, CutError, DirtyLog, DiskCommit, DiskCut, Output, PauseError, StateCapture, Vcpus,
    PARK_DEADLINE,
};
use crate::memory::GuestMemory;
use crate::output::OutputGate;
use crate::vcpu::{ControlError, VcpuControl};
use crate::vm_state::VmState;

/// The vCPU threads, paused through their controls.
pub(super) struct KvmVcpus {
    pub controls: Vec<Arc<VcpuControl>>,
    /// Set while the user holds the guest paused (`vm.pause`): a cut then finds the
    /// vCPUs parked already and leaves them parked.
    pub held: Arc<AtomicBool>,
}

impl Vcpus for KvmVcpus {
    fn pause(&mut self) -> Result<(), PauseError> {
        // Each vCPU thread saves its own state on its own thread, while this thread
        // goes on with the harvest and the copy; `KvmState::save` collects the
        // saves.
        //
        // Ordering rule: a vCPU's state is read only once every vCPU has left
        // KVM_RUN. A vCPU still running can send an IPI (or an NMI) to one that
        // already saved: the sender's state would show it sent and the receiver's
        // LAPIC would not hold it, so a restore from that checkpoint loses the
        // interrupt (a Linux guest then waits for ever on a function call it sent).
        // With one vCPU there is no other sender, and it saves as soon as it parks.
        let one = self.controls.len() == 1;
        for v in &self.controls {
            if one {
                v.request_pause_and_save();
            } else {
                v.request_pause();
            }
        }
        for v in &self.controls {
            v.wait_parked(PARK_DEADLINE).map_err(pause_error)?;
        }
        if !one {
            for v in &self.controls {
                v.request_save().map_err(pause_error)?;
            }
        }
        Ok(())
    }

    fn resume(&mut self) {
        if self.held.load(Ordering::Acquire) {
            return;
        }
        for v in &self.controls {
            v.resume();
        }
    }
}

/// A vCPU control's failure as the cut sees it: a vCPU whose thread ended is ending
/// the run for its own reason.
fn pause_error(e: ControlError) -> PauseError {
    match e {
        ControlError::Exited(i) => PauseError::Exited(i),
        e => PauseError::Failed(Box::new(e)),
    }
}

/// KVM's dirty log united with vm-memory's bitmap, with manual re-protection and
/// the hot-page policy (`crate::dirty`).
pub(super) struct KvmDirtyLog {
    vm: Arc<VmFd>,
    mem: GuestMemory,
    hot: HotPages,
    /// When the last cut re-protected: the length of the epoch since.
    last_cut: Option<std::time::Instant>,
}

impl KvmDirtyLog {
    /// Switches on manual dirty-log protection for `vm` and sets up the policy.
    pub fn new(
        vm: Arc<VmFd>,
        mem: GuestMemory,
        config: HotConfig,
    ) -> Result<Self, dirty::DirtyError> {
        dirty::enable_manual_protect(&vm)?;
        let pages: Vec<usize> = mem
            .iter()
            .map(|r| crate::arch::to_usize(r.len()) / dirty::PAGE_SIZE)
            .collect();
        let hot = HotPages::new(&pages, config);
        tracing::info!(
            "dirty tracking: manual protection, policy {:?}, fault {} ns ({}), copy {} ns a page, pause budget {:?} ({} hot pages at most)",
            config.policy,
            config.costs.fault_ns,
            config.fault_from,
            config.costs.copy_ns,
            config.budget,
            hot.max_hot()
        );
        Ok(KvmDirtyLog {
            vm,
            mem,
            hot,
            last_cut: None,
        })
    }
}

impl DirtyLog for KvmDirtyLog {
    fn read(&mut self) -> Result<DirtySet, CutError> {
        dirty::read(&self.vm, &self.mem).map_err(|e| CutError::DirtyLog(Box::new(e)))
    }

    fn protect(&mut self, set: &DirtySet, how: Protect) -> Result<u64, CutError> {
        if how == Protect::Hot {
            let now = std::time::Instant::now();
            if let Some(last) = self.last_cut.replace(now) {
                self.hot.observe_epoch(now.duration_since(last));
            }
        }
        let chosen = self.hot.choose(set, how);
        // KVM_CLEAR_DIRTY_LOG: complete when it returns. The cut copies afterwards,
        // and resumes the vCPUs after the copy (the ordering rule).
        dirty::clear(&self.vm, &self.mem, &chosen).map_err(|e| CutError::DirtyLog(Box::new(e)))?;
        Ok(self.hot.hot() as u64)
    }

    fn copy(&mut self, set: &DirtySet, into: &mut StagedPages) -> Result<(), CutError> {
        let t = std::time::Instant::now();
        into.copy_from(&self.mem, set)
            .map_err(|e| CutError::PageCopy(Box::new(e)))?;
        self.hot.observe_copy(into.len(), t.elapsed());
        Ok(())
    }

    fn observe_export(&mut self, pages: usize, took: std::time::Duration) {
        self.hot.observe_export(pages, took);
    }
}

/// A block device and its transport, as the cut saves them.
pub(super) type DiskPair = (Arc<Mutex<Block>>, Arc<Mutex<MmioTransport>>);

/// Devices, vCPUs and the VM, saved in that order.
pub(super) struct KvmState {
    pub vm: Arc<VmFd>,
    pub vcpus: Vec<Arc<VcpuControl>>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub disks: Vec<DiskPair>,
}

impl StateCapture for KvmState {
    fn drain(&mut self) {
        for (block, _) in &self.disks {
            lock_recover(block).process_pending();
        }
    }

    fn save(&mut self) -> Result<MachineState, CutError> {
        let devices = DevicesState {
            serial: lock_recover(&self.serial).snapshot(),
            i8042: lock_recover(&self.i8042).snapshot(),
            disks: self
                .disks
                .iter()
                .map(|(b, t)| (lock_recover(t).snapshot(), lock_recover(b).snapshot()))
                .collect(),
        };
        let devices = postcard::to_stdvec(&devices).map_err(|e| CutError::Devices(Box::new(e)))?;
        // Every vCPU saved itself on its own thread (`KvmVcpus::pause` asked for it:
        // as it parked, or once all had parked when there are several), all at once
        // and while this thread harvested and copied.
        // Saved before the devices drained: an interrupt the drain raised may be
        // missing from a LAPIC, which is the case every restore covers already
        // (a device whose interrupt status is set raises it again; an irqfd
        // injection can always land after the interrupt controllers were saved).
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.wait_saved().map_err(|e| CutError::Vcpu(Box::new(e)))?);
        }
        let vm = VmState::save(&self.vm).map_err(|e| CutError::Vm(Box::new(e)))?;
        Ok(MachineState { vcpus, vm, devices })
    }
}

/// The checkpointed disks' stores, at the cut (device loop) and after (exporter).
#[derive(Clone)]
pub(super) struct Stores {
    /// Each checkpointed disk: its index in attach order and its store.
    pub stores: Vec<(usize, Arc<SharedStore>)>,
    /// Every block device, kicked after a cut so deferred writes go again.
    pub blocks: Vec<Arc<Mutex<Block>>>,
}

impl DiskCut for Stores {
    fn start_checkpoint(&mut self, epoch: u64) -> Result<u64, CutError> {
        let mut bytes = 0;
        for (_, store) in &self.stores {
            let mut s = store.lock();
            s.start_checkpoint(epoch)
                .map_err(|e| CutError::DiskRegion(Box::new(e)))?;
            bytes += s.status().frozen.last().map_or(0, |r| r.used_bytes);
        }
        // A write deferred for lack of room goes again into the new active region.
        if !self.stores.is_empty() {
            for block in &self.blocks {
                let _ = lock_recover(block).kick_evt().write(1);
            }
        }
        Ok(bytes)
    }

    fn wants_cut(&self) -> bool {
        self.stores.iter().any(|(_, s)| s.lock().end_epoch_early())
    }
}

impl DiskCommit for Stores {
    fn seal(&mut self, epoch: u64, mode: StorageMode) -> Result<Vec<DiskRegion>, Cause> {
        let mut out = Vec::with_capacity(self.stores.len());
        for (disk, store) in &self.stores {
            let mut s = store.lock();
            let content = match mode {
                StorageMode::Shared => RegionContent::Meta(s.export_meta(epoch)?),
                StorageMode::Replicated => RegionContent::Data(s.export(epoch)?),
            };
            out.push(DiskRegion {
                disk: *disk,
                content,
            });
        }
        Ok(out)
    }

    fn retire(&mut self, epoch: u64) -> Result<(), Cause> {
        for (_, store) in &self.stores {
            acknowledge_and_retire(store, epoch)?;
        }
        Ok(())
    }

    fn retire_all(&mut self) -> Result<(), Cause> {
        for (_, store) in &self.stores {
            let frozen: Vec<u64> = store
                .lock()
                .status()
                .frozen
                .iter()
                .map(|r| r.epoch)
                .collect();
            for epoch in frozen {
                acknowledge_and_retire(store, epoch)?;
            }
        }
        Ok(())
    }
}

/// Records that `epoch` is held elsewhere (or needs no holder) and retires its
/// region. The copy into the base image runs without the store's lock
/// (`SharedStore::retire`), so the device keeps serving the guest meanwhile.
fn acknowledge_and_retire(store: &SharedStore, epoch: u64) -> Result<(), devices::store::Error> {
    store.lock().acknowledge(epoch)?;
    store.retire(epoch)
}

/// The console's output gate.
pub(super) struct Gate(pub Arc<OutputGate>);

impl Output for Gate {
    fn seal(&mut self, epoch: u64) -> crate::checkpoint::Console {
        self.0.seal(epoch)
    }

    fn release(&mut self, epoch: u64) {
        self.0.release(epoch);
    }

    fn release_all(&mut self) {
        self.0.open();
    }

    fn hold(&mut self) {
        self.0.hold();
    }
}
