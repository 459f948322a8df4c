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

/// The CPU a guest was started on, as a standby must be able to continue it: the
/// feature words the guest sees and the TSC frequency it was told. Sent in the
/// replication Hello and checked by the standby against its own host before it
/// accepts (a guest that uses a feature the standby's host lacks would fault after
/// a failover; one told another TSC frequency would keep wrong time).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestCpu {
    /// TSC frequency in kHz, if KVM reported one.
    pub tsc_khz: Option<u32>,
    /// Feature words: (leaf, subleaf, register name, bits) of the leaves
    /// [`FEATURE_WORDS`] names.
    pub features: Vec<(u32, u32, char, u32)>,
}

/// The CPUID words compared between hosts: leaf 1 ECX/EDX, leaf 7.0 EBX/ECX/EDX,
/// leaf 0x8000_0001 ECX/EDX.
pub const FEATURE_WORDS: [(u32, u32, char); 7] = [
    (1, 0, 'c'),
    (1, 0, 'd'),
    (7, 0, 'b'),
    (7, 0, 'c'),
    (7, 0, 'd'),
    (0x8000_0001, 0, 'c'),
    (0x8000_0001, 0, 'd'),
];

/// Bits the VMM sets itself (hypervisor, HTT): not host features.
fn vmm_bits(leaf: u32, reg: char) -> u32 {
    match (leaf, reg) {
        (LEAF_FEATURES, 'c') => ECX_HYPERVISOR,
        (LEAF_FEATURES, 'd') => EDX_HTT,
        _ => 0,
    }
}

impl GuestCpu {
    /// The feature words of `cpuid` and the TSC frequency.
    pub fn of(cpuid: &[kvm_cpuid_entry2], tsc_khz: Option<u32>) -> GuestCpu {
        let mut features = Vec::new();
        for (leaf, sub, reg) in FEATURE_WORDS {
            let word = cpuid
                .iter()
                .find(|e| e.function == leaf && (e.index == sub || leaf != 7))
                .map_or(0, |e| match reg {
                    'b' => e.ebx,
                    'c' => e.ecx,
                    _ => e.edx,
                });
            features.push((leaf, sub, reg, word & !vmm_bits(leaf, reg)));
        }
        GuestCpu { tsc_khz, features }
    }

    /// Whether a guest started on `self` can continue on a host offering `host`:
    /// every feature bit it sees must be there, and the TSC frequency must agree
    /// within 0.1 %. The error is one sentence for both sides' logs.
    pub fn check_runs_on(&self, host: &GuestCpu) -> Result<(), String> {
        for &(leaf, sub, reg, bits) in &self.features {
            let there = host
                .features
                .iter()
                .find(|f| f.0 == leaf && f.1 == sub && f.2 == reg)
                .map_or(0, |f| f.3);
            let missing = bits & !there;
            if missing != 0 {
                return Err(format!(
                    "the guest uses CPU features this host lacks: CPUID leaf {leaf:#x}.{sub} e{reg}x bits {missing:#010x}"
                ));
            }
        }
        if let (Some(a), Some(b)) = (self.tsc_khz, host.tsc_khz) {
            if u64::from(a.abs_diff(b)) * 1000 > u64::from(a) {
                return Err(format!(
                    "the guest's TSC runs at {a} kHz, this host's at {b} kHz"
                ));
            }
        }
        Ok(())
    }
}

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
mod guest_cpu_tests {
    use super::*;

    fn entry(function: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn a_guest_runs_only_where_its_features_and_tsc_are() {
        let host = GuestCpu::of(
            &[entry(1, 0b1011, 0xff), entry(0x8000_0001, 1, 1)],
            Some(2_000_000),
        );
        let guest = GuestCpu::of(&[entry(1, 0b0011 | ECX_HYPERVISOR, 0x0f)], Some(2_000_500));
        assert_eq!(guest.check_runs_on(&host), Ok(()));
        let wants_more = GuestCpu::of(&[entry(1, 0b0111, 0)], Some(2_000_000));
        let e = wants_more.check_runs_on(&host).unwrap_err();
        assert!(e.contains("leaf 0x1.0 ecx bits 0x00000004"), "{e}");
        let other_tsc = GuestCpu::of(&[entry(1, 0, 0)], Some(2_100_000));
        assert!(other_tsc.check_runs_on(&host).unwrap_err().contains("TSC"));
    }
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
