//! The CPUID a guest vCPU sees: what KVM supports, filtered as a real VMM must (topology and APIC IDs
//! that match the MP table, the hypervisor bit, no PMU that we do not virtualise).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;

/// x2APIC topology level types (CPUID 0xb ECX[15:8]).
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Rewrites `cpuid` (KVM's supported set) for vCPU `index` of `count`: one socket, `count` cores, one
/// thread each, APIC ID = index. `tsc_deadline`: KVM emulates the LAPIC's TSC-deadline timer
/// (KVM_CAP_TSC_DEADLINE_TIMER), which KVM_GET_SUPPORTED_CPUID never reports itself.
pub fn filter_for_vcpu(cpuid: &mut CpuId, index: u8, count: u8, tsc_deadline: bool) {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    // bits needed to number the cores: the x2APIC ID shift of the package level
    let core_bits = u32::BITS - (count - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        filter_entry(entry, apic_id, count, core_bits);
        if entry.function == LEAF_FEATURES && tsc_deadline {
            // Without it Linux calibrates the LAPIC timer against a slow reference and, under an
            // emulated or busy host, gives up on it ("APIC timer disabled due to verification
            // failure"): seconds of boot, and a coarse fallback timer afterwards.
            entry.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

fn filter_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, core_bits: u32) {
    match entry.function {
        LEAF_FEATURES => {
            entry.ebx = (apic_id << 24) | (count << 16) | (CLFLUSH_LINE_SIZE << 8);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_TOPOLOGY => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1. Caches are
            // presented as private to each core.
            entry.eax &= !(0xfc00_0000 | 0x03ff_c000);
            entry.eax |= (count - 1) << 26;
        }
        LEAF_PMU => {
            // No architectural performance monitoring: the guest would program counters we do not
            // save, and every access would be an exit.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0; // one thread per core: no SMT bits
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = count;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = (LEVEL_TYPE_INVALID << 8) | entry.index;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: !ECX_HYPERVISOR,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0),
            entry(LEAF_FEATURES, 0),
            entry(LEAF_CACHE_TOPOLOGY, 0),
            entry(LEAF_PMU, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn apic_id_count_and_hypervisor_bit() {
        let mut c = sample();
        filter_for_vcpu(&mut c, 3, 4, false);
        let l1 = find(&c, LEAF_FEATURES, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let mut single = sample();
        filter_for_vcpu(&mut single, 0, 1, false);
        assert_eq!(find(&single, LEAF_FEATURES, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_one_socket_of_single_thread_cores() {
        let mut c = sample();
        filter_for_vcpu(&mut c, 5, 6, false);
        let smt = find(&c, LEAF_TOPOLOGY, 0);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8 & 0xff, smt.edx),
            (0, 1, LEVEL_TYPE_SMT, 5)
        );
        let core = find(&c, LEAF_TOPOLOGY, 1);
        // 6 cores need 3 bits of APIC ID
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8 & 0xff, core.edx),
            (3, 6, LEVEL_TYPE_CORE, 5)
        );
        let end = find(&c, LEAF_TOPOLOGY, 2);
        assert_eq!((end.ebx, end.ecx >> 8 & 0xff), (0, LEVEL_TYPE_INVALID));
        assert_eq!(find(&c, LEAF_CACHE_TOPOLOGY, 0).eax >> 26, 5);
    }

    #[test]
    fn pmu_is_hidden_and_other_leaves_untouched() {
        let mut c = sample();
        filter_for_vcpu(&mut c, 0, 1, false);
        let pmu = find(&c, LEAF_PMU, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        assert_eq!(find(&c, 0, 0).eax, 0xffff_ffff);
    }

    #[test]
    fn tsc_deadline_is_announced_only_when_kvm_has_it() {
        let mut c = sample();
        filter_for_vcpu(&mut c, 0, 1, true);
        assert_ne!(find(&c, LEAF_FEATURES, 0).ecx & ECX_TSC_DEADLINE, 0);
        let mut entries = [entry(LEAF_FEATURES, 0)];
        entries[0].ecx = 0;
        let mut c = CpuId::from_entries(&entries).unwrap();
        filter_for_vcpu(&mut c, 0, 1, false);
        assert_eq!(find(&c, LEAF_FEATURES, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn one_vcpu_needs_no_core_bits() {
        let mut c = sample();
        filter_for_vcpu(&mut c, 0, 1, false);
        assert_eq!(find(&c, LEAF_TOPOLOGY, 1).eax, 0);
    }
}
