//! A vCPU's initial state: CPUID from what KVM supports (filtered per vCPU), the LAPIC's LINT pins,
//! and for the boot vCPU the registers, segments and FPU of the entry mode.

use kvm_bindings::{kvm_fpu, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use vm_memory::GuestAddress;

use super::vm::{kvm, VmError};
use crate::arch::cpuid;
use crate::arch::regs::{self, EntryMode};
use crate::guest_ram::GuestMemory;

/// What every vCPU's CPUID starts from: KVM's supported set, and whether the TSC deadline timer is
/// there to advertise.
pub struct CpuidTemplate {
    supported: CpuId,
    tsc_deadline: bool,
}

impl CpuidTemplate {
    pub fn of_host(kvm_handle: &Kvm) -> Result<Self, VmError> {
        Ok(CpuidTemplate {
            supported: kvm_handle
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm("get the supported CPUID"))?,
            tsc_deadline: kvm_handle.check_extension(Cap::TscDeadlineTimer),
        })
    }
}

/// Sets vCPU `index` of `count` up to run: CPUID and LAPIC for all, and for the boot vCPU (index 0)
/// the state of `mode` entering at `entry`. Application processors wait for INIT/SIPI from the boot
/// CPU, in the in-kernel LAPIC.
pub fn configure(
    vcpu: &VcpuFd,
    template: &CpuidTemplate,
    mem: &GuestMemory,
    index: u8,
    count: u8,
    mode: EntryMode,
    entry: GuestAddress,
) -> Result<(), VmError> {
    let mut cpuid = template.supported.clone();
    cpuid::filter_for_vcpu(&mut cpuid, index, count, template.tsc_deadline);
    vcpu.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
    set_lapic_lints(vcpu)?;
    if index != 0 {
        return Ok(());
    }
    let sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    let sregs = regs::setup_sregs(mem, mode, sregs)?;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
    vcpu.set_regs(&regs::boot_regs(mode, entry))
        .map_err(kvm("set regs"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set the FPU"))
}

/// LINT0 delivers ExtINT (the 8259's output), LINT1 NMI, as the MP table says.
fn set_lapic_lints(vcpu: &VcpuFd) -> Result<(), VmError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(kvm("get the LAPIC"))?;
    let mut set_mode = |reg: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    };
    set_mode(APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("set the LAPIC"))
}
