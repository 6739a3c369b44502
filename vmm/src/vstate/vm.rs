//! The KVM VM: /dev/kvm opened and checked, the VM created with its TSS, guest memory registered, the
//! in-kernel irqchip and PIT, and the irqfds and ioeventfds that devices use.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::KVM_TSS_ADDRESS;
use crate::arch::regs::{EntryMode, RegsError};
use crate::guest_ram::GuestMemory;

/// What KVM must offer: every one of these is used on the way to the first KVM_RUN.
const REQUIRED: [Cap; 5] = [
    Cap::Irqchip,
    Cap::Irqfd,
    Cap::Ioeventfd,
    Cap::UserMemory,
    Cap::Pit2,
];

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm: {0} (is KVM enabled, and may this user read and write /dev/kvm?)"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("this host's KVM lacks {0:?}, which vmm needs")]
    MissingCapability(Cap),
    #[error("KVM: cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory at {0:#x} has no host mapping")]
    NoHostMapping(u64),
    #[error(transparent)]
    Regs(#[from] RegsError),
}

/// A `map_err` for a KVM call that failed while doing `what`.
pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The VM and the /dev/kvm handle it came from.
pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
}

impl KvmVm {
    /// Opens /dev/kvm, checks what vmm needs, and creates a VM with its TSS placed.
    pub fn create() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        if let Some(cap) = REQUIRED.into_iter().find(|&cap| !kvm.check_extension(cap)) {
            return Err(VmError::MissingCapability(cap));
        }
        let fd = kvm.create_vm().map_err(self::kvm("create the VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(self::kvm("set the TSS address"))?;
        Ok(KvmVm { kvm, fd })
    }

    /// Registers every region of `mem` as a memory slot. The caller keeps `mem` mapped for as long as
    /// the VM lives (the builder's `Vm` drops this first).
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let start = region.start_addr().raw_value();
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::NoHostMapping(start))?;
            let region_desc = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: start,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the mapping described is owned by `mem`, which outlives the VM: the builder's
            // `Vm` declares this VM before the memory, so the VM (and its use of the mapping) is
            // dropped first.
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(kvm("register guest memory"))?;
        }
        Ok(())
    }

    /// The in-kernel IOAPIC, PIC and LAPICs, and the PIT (its speaker port a dummy).
    pub fn create_irqchip_and_pit(&self) -> Result<(), VmError> {
        self.fd
            .create_irq_chip()
            .map_err(kvm("create the irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(kvm("create the PIT"))
    }

    /// A write to `evt` raises `gsi` in the in-kernel irqchip, without a trip through user space.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm("register an irqfd"))
    }

    /// A guest write of `datamatch` to MMIO address `addr` signals `evt` inside KVM.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm("register an ioeventfd"))
    }

    /// Creates `count` vCPUs with their initial state (see `vstate::vcpu`): the boot vCPU enters at
    /// `entry` in `mode`, the others wait for INIT/SIPI.
    pub fn create_vcpus(
        &self,
        mem: &GuestMemory,
        count: u8,
        mode: EntryMode,
        entry: GuestAddress,
    ) -> Result<Vec<VcpuFd>, VmError> {
        let template = super::vcpu::CpuidTemplate::of_host(&self.kvm)?;
        (0..count)
            .map(|index| {
                let vcpu = self
                    .fd
                    .create_vcpu(u64::from(index))
                    .map_err(kvm("create a vCPU"))?;
                super::vcpu::configure(&vcpu, &template, mem, index, count, mode, entry)?;
                Ok(vcpu)
            })
            .collect()
    }
}
