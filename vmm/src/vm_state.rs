//! The VM-wide state KVM holds outside the vCPUs: both 8259 PICs, the IOAPIC, the
//! PIT and the kvmclock base.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Failures while saving or restoring VM state.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct VmStateError {
    /// The ioctl.
    pub what: &'static str,
    /// Cause.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmStateError> {
    r.map_err(|source| VmStateError { what, source })
}

/// Interrupt controllers, PIT and clock, as saved at a cut. `Default` is all zeros
/// (for tests that need a state without a VM).
#[derive(Default, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock's base.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn chip(vm: &VmFd, id: u32, what: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    kvm(what, vm.get_irqchip(&mut c))?;
    Ok(c)
}

impl VmState {
    /// Reads the VM state. Call with every vCPU parked, after the vCPUs' own state
    /// (their LAPICs) was saved: an interrupt raised in between would otherwise be
    /// in the IOAPIC but not in any LAPIC.
    pub fn save(vm: &VmFd) -> Result<VmState, VmStateError> {
        Ok(VmState {
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            pit: kvm("KVM_GET_PIT2", vm.get_pit2())?,
            clock: kvm("KVM_GET_CLOCK", vm.get_clock())?,
        })
    }

    /// Loads the state into a new VM whose irqchip and PIT exist.
    ///
    /// Ordering: the clock first (the PIT and the vCPUs' kvmclock pages count from
    /// it), then PIT, then the interrupt controllers; the vCPUs are restored after
    /// this, so their LAPICs see the IOAPIC routing in place.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        // KVM_SET_CLOCK accepts only the realtime flag; the others are read-only.
        let mut clock = self.clock;
        clock.flags = 0;
        kvm("KVM_SET_CLOCK", vm.set_clock(&clock))?;
        kvm("KVM_SET_PIT2", vm.set_pit2(&self.pit))?;
        kvm(
            "KVM_SET_IRQCHIP (PIC master)",
            vm.set_irqchip(&self.pic_master),
        )?;
        kvm(
            "KVM_SET_IRQCHIP (PIC slave)",
            vm.set_irqchip(&self.pic_slave),
        )?;
        kvm("KVM_SET_IRQCHIP (IOAPIC)", vm.set_irqchip(&self.ioapic))?;
        Ok(())
    }
}
