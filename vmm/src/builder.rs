//! Turns a validated [`VmConfig`] into a VM ready to run: KVM VM, guest memory, in-kernel irqchip, the
//! kernel and its initramfs loaded, boot parameters, command line and MP table written, devices wired
//! to the bus and to KVM (irqfd, ioeventfd), vCPUs created with their initial state.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{
    self, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::{self, Initrd};
use crate::arch::layout::*;
use crate::arch::regs::{self, EntryMode};
use crate::arch::{cpuid, mptable};
use crate::config::{KernelFormat, VmConfig};
use crate::devices::legacy::{self, SerialDevice, I8042};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, REG_QUEUE_NOTIFY};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{GuestMemory, Interrupt, VirtioDevice};
use crate::printk::PrintkLog;
use crate::timeline::Timeline;
use crate::vm_end::VmEnd;

/// The guest's vsock context ID (0-2 are reserved, 2 is the host).
pub const GUEST_CID: u64 = 3;

/// Kernel command line for every boot. Each item removes work the guest would do for nothing here.
/// `percpu_alloc=page`: the default ("embed") takes a 2 MiB block for the per-CPU areas and zeroes
/// it whole, though a vCPU uses ~160 KiB of it; every page touched is a fault in the host, so that
/// zeroing was ~100 ms of a boot in the emulated test host. Page mode allocates only what is used.
const BASE_CMDLINE: &str = "reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux \
     i8042.dumbkbd i8042.nopnp cryptomgr.notests tsc=reliable no_timer_check random.trust_cpu=on \
     percpu_alloc=page";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "cannot open /dev/kvm: {0} (is KVM enabled, and may this user read and write /dev/kvm?)"
    )]
    OpenKvm(kvm_ioctls::Error),
    #[error("this host's KVM lacks {0:?}, which vmm needs")]
    MissingCapability(Cap),
    #[error("KVM: {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    #[error("cannot open {0}: {1}")]
    Open(String, std::io::Error),
    #[error("cannot load the kernel {0}: {1}")]
    LoadKernel(String, loader::Error),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("cannot write the initramfs into guest memory")]
    WriteInitrd,
    #[error("device set-up: {0}")]
    Device(String),
    #[error("scratch disk: {0}")]
    Scratch(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Everything the running VM is made of.
pub struct Vm {
    // Declared first so it drops before the memory it maps into KVM.
    pub vm_fd: VmFd,
    pub mem: GuestMemory,
    pub vcpus: Vec<VcpuFd>,
    pub io: Arc<IoManager>,
    /// The devices' event-loop halves.
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    pub block: Arc<Mutex<Block>>,
    pub vsock: Arc<Mutex<Vsock>>,
    /// Reports the end of the VM from vCPUs and devices.
    pub end: Arc<VmEnd>,
    /// Connections from guest-init to the control port, as the vsock device accepts them.
    pub control: Receiver<UnixStream>,
    /// Host-clock stamps of the guest's milestones (timestamp device).
    pub guest_stamps: legacy::Stamps,
    /// The kernel's log lines, with `--console`.
    pub printk: Arc<Mutex<PrintkLog>>,
    pub cmdline: String,
    /// Host ranges of guest memory mapped from the kernel file (address, length).
    pub file_backed: Vec<(usize, usize)>,
}

/// Builds the VM. `init` is the guest-init binary packed into the initramfs when a command is to run.
pub fn build(config: &VmConfig, init: &[u8], timeline: &mut Timeline) -> Result<Vm, BuildError> {
    let kvm = Kvm::new().map_err(BuildError::OpenKvm)?;
    for cap in [
        Cap::Irqchip,
        Cap::Irqfd,
        Cap::Ioeventfd,
        Cap::UserMemory,
        Cap::Pit2,
    ] {
        if !kvm.check_extension(cap) {
            return Err(BuildError::MissingCapability(cap));
        }
    }
    let vm_fd = kvm
        .create_vm()
        .map_err(|e| BuildError::Kvm("create the VM", e))?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS)
        .map_err(|e| BuildError::Kvm("set the TSS address", e))?;

    // Memory before the irqchip and the PIT. Registering a memory slot waits for an SRCU grace period
    // of the VM (KVM_SET_USER_MEMORY_REGION -> synchronize_srcu_expedited). The irqchip's and the PIT's
    // I/O bus registrations start a lazy grace period on that same SRCU, whose worker runs a jiffy
    // later; an expedited wait that comes after one cannot start its own grace period before that
    // worker has run, so the memory slot then takes 1-2 jiffies (4-8 ms at HZ=250) instead of tens of
    // microseconds. Firecracker and Cloud Hypervisor register memory first too.
    let mem_size = config.mem_mib << 20;
    let mem = crate::guest_ram::map(&ram_regions(mem_size))
        .map_err(|e| BuildError::Memory(config.mem_mib, e.to_string()))?;
    register_memory(&vm_fd, &mem)?;

    vm_fd
        .create_irq_chip()
        .map_err(|e| BuildError::Kvm("create the irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd
        .create_pit2(pit)
        .map_err(|e| BuildError::Kvm("create the PIT", e))?;
    timeline.mark("kvm and memory set up");

    let (kernel, mode, entry, file_backed) = load_kernel(config, &mem)?;
    timeline.mark("kernel loaded");

    let (control_tx, control) = channel();
    let block = Arc::new(Mutex::new(
        Block::new(open_read_only(&config.rootfs)?, true)
            .map_err(|e| BuildError::Device(e.to_string()))?,
    ));
    let listeners = HashMap::from([(vmm_protocol::CONTROL_PORT, control_tx)]);
    let vsock = Arc::new(Mutex::new(
        Vsock::new(GUEST_CID, listeners).map_err(|e| BuildError::Device(e.to_string()))?,
    ));

    let mut io = IoManager::new();
    let end = Arc::new(VmEnd::new().map_err(BuildError::EventFd)?);
    let guest_stamps = legacy::Stamps::default();
    let printk = Arc::new(Mutex::new(PrintkLog::default()));
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(cmdline_error)?;
    cmdline.insert_str(BASE_CMDLINE).map_err(cmdline_error)?;
    add_legacy_devices(
        config,
        &vm_fd,
        &mut io,
        &end,
        &guest_stamps,
        &printk,
        &mut cmdline,
    )?;
    // Each virtio device twice: on the bus behind its transport, and in the event loop.
    let mut virtio: Vec<Arc<Mutex<dyn VirtioDevice>>> = vec![block.clone(), vsock.clone()];
    let mut subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        vec![block.clone(), vsock.clone()];
    if let Some(size) = config.scratch_bytes {
        let disk = Block::new(scratch_disk(size)?, false)
            .map_err(|e| BuildError::Device(format!("scratch disk: {e}")))?;
        let disk = Arc::new(Mutex::new(disk));
        virtio.push(disk.clone());
        subscribers.push(disk);
        // the second virtio-blk disk the guest probes
        cmdline
            .insert_str("vmm.scratch=vdb")
            .map_err(cmdline_error)?;
    }
    for (index, device) in (0u32..).zip(virtio) {
        add_virtio_device(index, device, &vm_fd, &mem, &mut io, &mut cmdline)?;
    }

    let initrd = if config.command.is_some() {
        // guest-init mounts the root image itself, under a private overlay
        cmdline.insert_str("rdinit=/init").map_err(cmdline_error)?;
        Some(load_initrd(&mem, mem_size, &kernel, mode, init)?)
    } else {
        cmdline
            .insert_str("root=/dev/vda ro rootfstype=ext4")
            .map_err(cmdline_error)?;
        None
    };
    if !config.append.is_empty() {
        cmdline.insert_str(&config.append).map_err(cmdline_error)?;
    }
    loader::load_cmdline(&mem, CMDLINE_START, &cmdline)
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    match mode {
        EntryMode::Pvh => boot::write_pvh_start_info(&mem, mem_size, initrd)?,
        EntryMode::Linux64 => {
            boot::write_zero_page(&mem, mem_size, kernel.setup_header, cmdline_len, initrd)?
        }
    }
    mptable::write(&mem, MPTABLE_START, config.vcpus)?;
    timeline.mark("boot parameters written");

    let vcpus = create_vcpus(&kvm, &vm_fd, &mem, config.vcpus, mode, entry)?;
    timeline.mark("devices and vcpus created");

    Ok(Vm {
        vm_fd,
        mem,
        vcpus,
        io: Arc::new(io),
        subscribers,
        block,
        vsock,
        end,
        control,
        guest_stamps,
        printk,
        cmdline: cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default(),
        file_backed,
    })
}

/// A sparse scratch disk of `size` bytes with an empty ext4 file system on it, private to this VM: the
/// file is unlinked as soon as it is open, so it is gone when vmm exits, however it exits.
fn scratch_disk(size: u64) -> Result<File, BuildError> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("vmm-scratch-{}.ext4", std::process::id()));
    let fail = |what: &str, e: std::io::Error| {
        BuildError::Scratch(format!("{what} {}: {e}", path.display()))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| fail("cannot create", e))?;
    let made = file
        .set_len(size)
        .map_err(|e| fail("cannot size", e))
        .and_then(|_| {
            // No journal: the disk dies with the VM, so there is nothing to recover after a crash.
            let out = crate::host_tool::command("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-O",
                    "^has_journal",
                    "-E",
                    "lazy_itable_init=1,root_owner=0:0",
                ])
                .arg(&path)
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| fail("cannot run mkfs.ext4 (install e2fsprogs) for", e))?;
            if out.status.success() {
                Ok(())
            } else {
                let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
                Err(fail("mkfs.ext4 failed on", std::io::Error::other(msg)))
            }
        });
    // Unlinked whatever happened: an open descriptor keeps the blocks until the VM ends.
    let _ = std::fs::remove_file(&path);
    made.map(|_| file)
}

fn cmdline_error(e: linux_loader::cmdline::Error) -> BuildError {
    BuildError::Cmdline(e.to_string())
}

fn open_read_only(path: &std::path::Path) -> Result<File, BuildError> {
    File::open(path).map_err(|e| BuildError::Open(path.display().to_string(), e))
}

fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<(), BuildError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| BuildError::Device("guest memory has no host mapping".into()))?;
        let region_desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping described is owned by `mem`, which outlives the VM: `Vm` declares
        // `vm_fd` before `mem`, so the VM (and its use of the mapping) is dropped first.
        unsafe { vm_fd.set_user_memory_region(region_desc) }
            .map_err(|e| BuildError::Kvm("register guest memory", e))?;
    }
    Ok(())
}

/// What loading the kernel gives: where it is, how it is entered, its entry point and the host ranges
/// of guest memory mapped from its file.
type LoadedKernel = (
    KernelLoaderResult,
    EntryMode,
    GuestAddress,
    Vec<(usize, usize)>,
);

/// Loads the kernel and decides how it is entered: PVH for an ELF with the note, else 64-bit.
fn load_kernel(config: &VmConfig, mem: &GuestMemory) -> Result<LoadedKernel, BuildError> {
    let mut file = open_read_only(&config.kernel)?;
    let path = config.kernel.display().to_string();
    match config.kernel_format {
        KernelFormat::Elf => {
            // segments are mapped from the file rather than copied (see kernel_file.rs)
            let mut file = crate::kernel_file::KernelFile::new(file)
                .map_err(|e| BuildError::Open(path.clone(), e))?;
            let result = Elf::load(mem, None, &mut file, Some(HIMEM_START))
                .map_err(|e| BuildError::LoadKernel(path, e))?;
            let mapped = std::mem::take(&mut file.mapped);
            match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => {
                    Ok((result, EntryMode::Pvh, entry, mapped))
                }
                _ => {
                    // linux-loader does not return e_entry; a vmlinux's 64-bit entry is its load address
                    Ok((result, EntryMode::Linux64, result.kernel_load, mapped))
                }
            }
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, Some(HIMEM_START))
                .map_err(|e| BuildError::LoadKernel(path, e))?;
            // startup_64 sits 0x200 into the protected-mode code
            let entry = result.kernel_load.unchecked_add(0x200);
            Ok((result, EntryMode::Linux64, entry, Vec::new()))
        }
    }
}

fn load_initrd(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &KernelLoaderResult,
    mode: EntryMode,
    init: &[u8],
) -> Result<Initrd, BuildError> {
    let size = crate::initramfs::size(init);
    let max_addr = match (mode, kernel.setup_header) {
        (EntryMode::Linux64, Some(hdr)) if hdr.initrd_addr_max != 0 => {
            u64::from(hdr.initrd_addr_max)
        }
        _ => u64::MAX,
    };
    let addr = boot::initrd_address(mem_size, size, kernel.kernel_end, max_addr)?;
    let mut at = addr;
    crate::initramfs::emit(init, |piece| {
        if piece.is_empty() {
            return Ok::<(), BuildError>(());
        }
        mem.write_slice(piece, at)
            .map_err(|_| BuildError::WriteInitrd)?;
        at = at
            .checked_add(piece.len() as u64)
            .ok_or(BuildError::WriteInitrd)?;
        Ok(())
    })?;
    Ok(Initrd { addr, size })
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)
}

fn add_legacy_devices(
    config: &VmConfig,
    vm_fd: &VmFd,
    io: &mut IoManager,
    end: &Arc<VmEnd>,
    stamps: &legacy::Stamps,
    printk: &Arc<Mutex<PrintkLog>>,
    cmdline: &mut Cmdline,
) -> Result<(), BuildError> {
    let bus_error = |e: vm_device::bus::Error| BuildError::Device(e.to_string());
    io.register_pio(
        PioRange::new(PioAddress(vmm_protocol::TIMESTAMP_PORT), 1).map_err(bus_error)?,
        Arc::new(Mutex::new(legacy::TimestampDevice::new(stamps.clone()))),
    )
    .map_err(bus_error)?;
    io.register_pio(
        PioRange::new(PioAddress(legacy::I8042_PORT_BASE), legacy::I8042_PORT_LEN)
            .map_err(bus_error)?,
        Arc::new(Mutex::new(I8042::new(legacy::ResetTrigger(end.clone())))),
    )
    .map_err(bus_error)?;
    if config.console {
        let irq = eventfd()?;
        vm_fd
            .register_irqfd(&irq, SERIAL_IRQ)
            .map_err(|e| BuildError::Kvm("register the serial irqfd", e))?;
        io.register_pio(
            PioRange::new(
                PioAddress(legacy::SERIAL_PORT_BASE),
                legacy::SERIAL_PORT_LEN,
            )
            .map_err(bus_error)?,
            Arc::new(Mutex::new(SerialDevice::new(
                irq,
                legacy::ConsoleOut {
                    printk: printk.clone(),
                },
            ))),
        )
        .map_err(bus_error)?;
        cmdline.insert_str("console=ttyS0").map_err(cmdline_error)?;
    } else {
        // no UART to probe, no console to print to: the kernel formats nothing for nobody
        cmdline
            .insert_str("8250.nr_uarts=0 quiet")
            .map_err(cmdline_error)?;
    }
    Ok(())
}

/// Puts `device` on the MMIO bus behind its transport, wires its interrupt and queue notifications
/// through KVM, and announces it on the kernel command line.
fn add_virtio_device(
    index: u32,
    device: Arc<Mutex<dyn VirtioDevice>>,
    vm_fd: &VmFd,
    mem: &GuestMemory,
    io: &mut IoManager,
    cmdline: &mut Cmdline,
) -> Result<(), BuildError> {
    let base = VIRTIO_MMIO_START + u64::from(index) * MMIO_WINDOW_SIZE;
    let irq = VIRTIO_IRQ_BASE + index;
    let irqfd = eventfd()?;
    vm_fd
        .register_irqfd(&irqfd, irq)
        .map_err(|e| BuildError::Kvm("register a virtio irqfd", e))?;
    {
        let dev = device.lock().unwrap_or_else(|p| p.into_inner());
        for (queue, evt) in (0u32..).zip(dev.queue_events()) {
            vm_fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY), queue)
                .map_err(|e| BuildError::Kvm("register a queue ioeventfd", e))?;
        }
    }
    let transport = MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(irqfd)))
        .map_err(|e| BuildError::Device(format!("virtio queue: {e:?}")))?;
    let range = MmioRange::new(MmioAddress(base), MMIO_WINDOW_SIZE)
        .map_err(|e| BuildError::Device(e.to_string()))?;
    io.register_mmio(range, Arc::new(Mutex::new(transport)))
        .map_err(|e| BuildError::Device(e.to_string()))?;
    cmdline
        .add_virtio_mmio_device(MMIO_WINDOW_SIZE, GuestAddress(base), irq, None)
        .map_err(cmdline_error)?;
    Ok(())
}

fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    mem: &GuestMemory,
    count: u8,
    mode: EntryMode,
    entry: GuestAddress,
) -> Result<Vec<VcpuFd>, BuildError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BuildError::Kvm("get the supported CPUID", e))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let vcpu = vm_fd
            .create_vcpu(u64::from(index))
            .map_err(|e| BuildError::Kvm("create a vCPU", e))?;
        let mut cpuid = supported.clone();
        cpuid::filter_for_vcpu(&mut cpuid, index, count, tsc_deadline);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| BuildError::Kvm("set CPUID", e))?;
        set_lapic_lints(&vcpu)?;
        if index == 0 {
            // Application processors wait for INIT/SIPI from the boot CPU, in the in-kernel LAPIC.
            let sregs = vcpu
                .get_sregs()
                .map_err(|e| BuildError::Kvm("get sregs", e))?;
            let sregs = regs::setup_sregs(mem, mode, sregs)?;
            vcpu.set_sregs(&sregs)
                .map_err(|e| BuildError::Kvm("set sregs", e))?;
            vcpu.set_regs(&regs::boot_regs(mode, entry))
                .map_err(|e| BuildError::Kvm("set regs", e))?;
            let fpu = kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            vcpu.set_fpu(&fpu)
                .map_err(|e| BuildError::Kvm("set the FPU", e))?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// LINT0 delivers ExtINT (the 8259's output), LINT1 NMI, as the MP table says.
fn set_lapic_lints(vcpu: &VcpuFd) -> Result<(), BuildError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| BuildError::Kvm("get the LAPIC", e))?;
    let mut set_mode = |reg: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    };
    set_mode(APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| BuildError::Kvm("set the LAPIC", e))?;
    Ok(())
}
