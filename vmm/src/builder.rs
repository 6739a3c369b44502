//! Turns a validated [`VmConfig`] into a VM ready to run: KVM VM and guest memory (`vstate`), the
//! kernel and its initramfs loaded, boot parameters, command line and MP table written, devices added
//! through the device manager, vCPUs created with their initial state.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{
    self, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::{self, Initrd};
use crate::arch::layout::*;
use crate::arch::mptable;
use crate::arch::regs::EntryMode;
use crate::config::{KernelFormat, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager, Devices};
use crate::devices::legacy::{self, SerialDevice, I8042};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::guest_ram::GuestMemory;
use crate::printk::PrintkLog;
use crate::timeline::Timeline;
use crate::vm_end::VmEnd;
use crate::vstate::{KvmVm, VmError};

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
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, #[source] crate::guest_ram::GuestRamError),
    #[error("cannot open {0}: {1}")]
    Open(String, #[source] std::io::Error),
    #[error("cannot load the kernel {0}: {1}")]
    LoadKernel(String, #[source] loader::Error),
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest memory: {0}")]
    WriteCmdline(#[source] loader::Error),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("cannot write the initramfs into guest memory")]
    WriteInitrd,
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{0}: {1}")]
    Block(&'static str, #[source] BlockError),
    #[error("the vsock device: {0}")]
    Vsock(#[source] std::io::Error),
    #[error("scratch disk: {0}")]
    Scratch(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Passt(#[from] crate::net::passt::PasstError),
    #[error("the network device: {0}")]
    Net(#[from] crate::devices::virtio::net::NetError),
}

/// Everything the running VM is made of.
pub struct Vm {
    // Declared first so it drops before the memory it maps into KVM.
    pub kvm: KvmVm,
    pub mem: GuestMemory,
    pub vcpus: Vec<VcpuFd>,
    pub devices: Devices,
    /// Reports the end of the VM from vCPUs and devices.
    pub end: Arc<VmEnd>,
    /// Connections from guest-init to the control port, as the vsock device accepts them; taken by
    /// the control thread (dropped with no command, so the port refuses).
    pub control: Option<Receiver<UnixStream>>,
    /// What the guest tells the host's clock and console: milestone stamps, printk lines.
    pub observed: Observed,
    /// Host ranges of guest memory mapped from the kernel file (address, length).
    pub file_backed: Vec<(usize, usize)>,
    /// With `--net`: the VM's passt, which exits when the network device's socket closes, or with vmm.
    pub passt: Option<crate::net::passt::Passt>,
}

/// What the legacy devices record of the guest for the result and the trace.
pub struct Observed {
    /// Host-clock stamps of the guest's milestones (timestamp device).
    pub guest_stamps: legacy::Stamps,
    /// The kernel's log lines, with `--console`.
    pub printk: Arc<Mutex<PrintkLog>>,
}

/// Builds the VM. `init` is the guest-init binary packed into the initramfs when a command is to run.
pub fn build(config: &VmConfig, init: &[u8], timeline: &mut Timeline) -> Result<Vm, BuildError> {
    let kvm = KvmVm::create()?;
    // Memory before the irqchip and the PIT. Registering a memory slot waits for an SRCU grace period
    // of the VM (KVM_SET_USER_MEMORY_REGION -> synchronize_srcu_expedited). The irqchip's and the PIT's
    // I/O bus registrations start a lazy grace period on that same SRCU, whose worker runs a jiffy
    // later; an expedited wait that comes after one cannot start its own grace period before that
    // worker has run, so the memory slot then takes 1-2 jiffies (4-8 ms at HZ=250) instead of tens of
    // microseconds. Firecracker and Cloud Hypervisor register memory first too.
    let mem_size = config.mem_mib << 20;
    let mem = crate::guest_ram::map(&ram_regions(mem_size))
        .map_err(|e| BuildError::Memory(config.mem_mib, e))?;
    kvm.register_memory(&mem)?;
    kvm.create_irqchip_and_pit()?;
    timeline.mark("kvm and memory set up");

    let (kernel, mode, entry, file_backed) = load_kernel(config, &mem)?;
    timeline.mark("kernel loaded");

    let end = Arc::new(VmEnd::new().map_err(BuildError::EventFd)?);
    let observed = Observed {
        guest_stamps: legacy::Stamps::default(),
        printk: Arc::new(Mutex::new(PrintkLog::default())),
    };
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE)?;
    cmdline.insert_str(BASE_CMDLINE)?;
    let mut devices = DeviceManager::default();
    add_legacy_devices(config, &kvm, &mut devices, &end, &observed, &mut cmdline)?;

    let (control, passt) = add_virtio_devices(config, &kvm, &mem, &mut devices, &mut cmdline)?;
    if passt.is_some() {
        timeline.mark("passt started");
    }

    let initrd = if config.command.is_some() {
        // guest-init mounts the root image itself, under a private overlay
        cmdline.insert_str("rdinit=/init")?;
        Some(load_initrd(&mem, mem_size, &kernel, mode, init)?)
    } else {
        cmdline.insert_str("root=/dev/vda ro rootfstype=ext4")?;
        None
    };
    if !config.append.is_empty() {
        cmdline.insert_str(&config.append)?;
    }
    loader::load_cmdline(&mem, CMDLINE_START, &cmdline).map_err(BuildError::WriteCmdline)?;
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

    let vcpus = kvm.create_vcpus(&mem, config.vcpus, mode, entry)?;
    timeline.mark("devices and vcpus created");

    Ok(Vm {
        kvm,
        mem,
        vcpus,
        devices: devices.finish(),
        end,
        control: Some(control),
        observed,
        file_backed,
        passt,
    })
}

/// The virtio devices: the root image, the vsock control channel, the scratch disk with `--scratch`,
/// and with `--net` the network device and its passt. Returns the control connections' receiver and
/// the passt.
fn add_virtio_devices(
    config: &VmConfig,
    kvm: &KvmVm,
    mem: &GuestMemory,
    devices: &mut DeviceManager,
    cmdline: &mut Cmdline,
) -> Result<(Receiver<UnixStream>, Option<crate::net::passt::Passt>), BuildError> {
    let root = Block::new(open_read_only(&config.rootfs)?, true)
        .map_err(|e| BuildError::Block("the root image", e))?;
    devices.add_virtio_device("virtio-blk", Arc::new(Mutex::new(root)), kvm, mem, cmdline)?;
    let (control_tx, control) = channel();
    let listeners = HashMap::from([(vmm_protocol::CONTROL_PORT, control_tx)]);
    let vsock = Vsock::new(GUEST_CID, listeners).map_err(BuildError::Vsock)?;
    devices.add_virtio_device(
        "virtio-vsock",
        Arc::new(Mutex::new(vsock)),
        kvm,
        mem,
        cmdline,
    )?;
    if let Some(size) = config.scratch_bytes {
        let disk = Block::new(scratch_disk(size)?, false)
            .map_err(|e| BuildError::Block("the scratch disk", e))?;
        devices.add_virtio_device(
            "virtio-blk scratch",
            Arc::new(Mutex::new(disk)),
            kvm,
            mem,
            cmdline,
        )?;
        // the second virtio-blk disk the guest probes
        cmdline.insert_str("vmm.scratch=vdb")?;
    }
    let passt = match &config.net {
        Some(net) => {
            let (passt, socket) = crate::net::passt::start(&net.passt)?;
            let policy = crate::net::Policy::new(crate::net::passt::addresses(), net.allow.clone());
            let device = Net::new(crate::net::passt::GUEST_MAC, socket, policy)?;
            devices.add_virtio_device(
                "virtio-net",
                Arc::new(Mutex::new(device)),
                kvm,
                mem,
                cmdline,
            )?;
            Some(passt)
        }
        None => None,
    };
    Ok((control, passt))
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
            let out = vmm_rootfs::host_tool::command("mkfs.ext4")
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

fn open_read_only(path: &std::path::Path) -> Result<File, BuildError> {
    File::open(path).map_err(|e| BuildError::Open(path.display().to_string(), e))
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

fn add_legacy_devices(
    config: &VmConfig,
    kvm: &KvmVm,
    devices: &mut DeviceManager,
    end: &Arc<VmEnd>,
    observed: &Observed,
    cmdline: &mut Cmdline,
) -> Result<(), BuildError> {
    devices.add_port_device(
        "timestamp",
        vmm_protocol::TIMESTAMP_PORT,
        1,
        legacy::TimestampDevice::new(observed.guest_stamps.clone()),
    )?;
    devices.add_port_device(
        "i8042",
        legacy::I8042_PORT_BASE,
        legacy::I8042_PORT_LEN,
        I8042::new(legacy::ResetTrigger(end.clone())),
    )?;
    if config.console {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        kvm.register_irqfd(&irq, SERIAL_IRQ)?;
        let console = legacy::ConsoleOut {
            printk: observed.printk.clone(),
        };
        devices.add_port_device(
            "serial",
            legacy::SERIAL_PORT_BASE,
            legacy::SERIAL_PORT_LEN,
            SerialDevice::new(irq, console),
        )?;
        cmdline.insert_str("console=ttyS0")?;
    } else {
        // no UART to probe, no console to print to: the kernel formats nothing for nobody
        cmdline.insert_str("8250.nr_uarts=0 quiet")?;
    }
    Ok(())
}
