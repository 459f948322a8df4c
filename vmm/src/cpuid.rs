//! The CPUID a guest sees: KVM's supported list, with per-vCPU APIC ids, the
//! hypervisor bit, and the TSC frequency published at [`CPUID_TSC_LEAF`].

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::layout::CPUID_TSC_LEAF;

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EBX_CLFLUSH_SIZE: u32 = 8 << 8; // 8 × 8 bytes
const EDX_HTT: u32 = 1 << 28;

/// Adjusts KVM's supported CPUID for vCPU `index` of `count`.
///
/// `tsc_khz` (when known) is published in EAX of leaf 0x4000_0010, and the
/// hypervisor leaf's maximum is raised to include it.
pub fn filter(
    cpuid: &mut CpuId,
    index: u8,
    count: u8,
    tsc_khz: Option<u32>,
) -> Result<(), vmm_sys_util::fam::Error> {
    let mut has_tsc_leaf = false;
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | EBX_CLFLUSH_SIZE;
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY => {
                // x2APIC id of this vCPU; one thread per core, `count` cores.
                e.edx = u32::from(index);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = 8;
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_HYPERVISOR if tsc_khz.is_some() => {
                e.eax = e.eax.max(CPUID_TSC_LEAF);
            }
            CPUID_TSC_LEAF => has_tsc_leaf = true,
            _ => {}
        }
    }
    if let (Some(khz), false) = (tsc_khz, has_tsc_leaf) {
        cpuid.push(kvm_cpuid_entry2 {
            function: CPUID_TSC_LEAF,
            eax: khz,
            ..Default::default()
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_id_hypervisor_bit_and_tsc_leaf() {
        let mut c = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_HYPERVISOR,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .unwrap();
        filter(&mut c, 3, 4, Some(2_500_000)).unwrap();
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(s[1].eax, CPUID_TSC_LEAF);
        let tsc = s.iter().find(|e| e.function == CPUID_TSC_LEAF).unwrap();
        assert_eq!(tsc.eax, 2_500_000);
    }
}
