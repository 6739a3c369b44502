//! Boot parameters: the e820 memory map, and the structures that hand it, the command line and the
//! initramfs to the kernel, for both entry paths (PVH `hvm_start_info` for an ELF vmlinux with a PVH
//! note, the Linux boot protocol's zero page for a bzImage).

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use super::layout::*;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// The zero page's 32-bit pointer to the command line.
const CMDLINE_PTR: u32 = below_4g(CMDLINE_START.0);

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("guest memory of {0} MiB is too small to hold the kernel and its initramfs")]
    MemoryTooSmall(u64),
    #[error("the initramfs ({0} bytes) does not fit below the kernel's initrd limit")]
    InitrdTooLarge(usize),
    #[error("the {0} does not fit its 32-bit boot-protocol field")]
    FieldTooLarge(&'static str),
    #[error("cannot write the boot parameters into guest memory: {0}")]
    Write(#[from] linux_loader::configurator::Error),
}

/// One e820 entry: [addr, addr + size) of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map a guest with `mem_size` bytes of RAM sees. The EBDA (which holds the MP table) and the
/// legacy VGA/BIOS hole are left out, so the kernel never allocates them.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![E820Entry {
        addr: 0,
        size: LOW_RAM_END,
        kind: E820_RAM,
    }];
    let below_gap_end = mem_size.min(MMIO_GAP_START);
    if below_gap_end > HIMEM_START.0 {
        map.push(E820Entry {
            addr: HIMEM_START.0,
            size: below_gap_end - HIMEM_START.0,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Where an initramfs of `size` bytes goes: page-aligned at the top of RAM below the MMIO gap (and below
/// `max_addr`, the kernel's limit), clear of the kernel image that ends at `kernel_end`.
pub fn initrd_address(
    mem_size: u64,
    size: usize,
    kernel_end: u64,
    max_addr: u64,
) -> Result<GuestAddress, BootError> {
    let top = mem_size.min(MMIO_GAP_START).min(max_addr.saturating_add(1));
    let start = top
        .checked_sub(size as u64)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(BootError::InitrdTooLarge(size))?;
    Ok(GuestAddress(start))
}

/// Where the initramfs is and how big.
#[derive(Debug, Clone, Copy)]
pub struct Initrd {
    pub addr: GuestAddress,
    pub size: usize,
}

/// Writes `hvm_start_info`, its memory map and the initramfs module entry for the PVH entry path.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<Initrd>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let memmap_addr = PVH_INFO_START.unchecked_add(std::mem::size_of::<hvm_start_info>() as u64);
    let modlist_addr = memmap_addr
        .unchecked_add((std::mem::size_of::<hvm_memmap_table_entry>() * memmap.len()) as u64);

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START.raw_value(),
        memmap_paddr: memmap_addr.raw_value(),
        memmap_entries: u32::try_from(memmap.len())
            .map_err(|_| BootError::FieldTooLarge("e820 map"))?,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, PVH_INFO_START);
    params.set_sections(&memmap, memmap_addr);
    if let Some(initrd) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist_addr.raw_value();
        params = BootParams::new(&start_info, PVH_INFO_START);
        params.set_sections(&memmap, memmap_addr);
        let module = hvm_modlist_entry {
            paddr: initrd.addr.raw_value(),
            size: initrd.size as u64,
            ..Default::default()
        };
        params.set_modules(&[module], modlist_addr);
    }
    PvhBootConfigurator::write_bootparams(&params, mem)?;
    Ok(())
}

/// Writes the zero page for the 64-bit Linux boot protocol, from the bzImage's own setup header.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<Initrd>,
) -> Result<(), BootError> {
    // An ELF vmlinux entered at its 64-bit entry has no setup header of its own: the defaults do.
    let mut params = boot_params {
        hdr: header.unwrap_or_default(),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_PTR;
    params.hdr.cmdline_size =
        u32::try_from(cmdline_len).map_err(|_| BootError::FieldTooLarge("command line"))?;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    // initrd_address places the initramfs below the MMIO gap, so both fit; a value that did not
    // would be refused, not cut short.
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = u32::try_from(initrd.addr.raw_value())
            .map_err(|_| BootError::InitrdTooLarge(initrd.size))?;
        params.hdr.ramdisk_size =
            u32::try_from(initrd.size).map_err(|_| BootError::InitrdTooLarge(initrd.size))?;
    }
    let map = e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    // at most the zero page's 128 e820 slots
    #[allow(clippy::cast_possible_truncation)]
    let entries = map.len().min(params.e820_table.len()) as u8;
    params.e820_entries = entries;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, ZERO_PAGE_START), mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;
    use vm_memory::Bytes;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    #[test]
    fn e820_small_guest() {
        let map = e820_map(256 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: LOW_RAM_END,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (256 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn e820_large_guest_continues_above_4g_and_never_covers_the_gap() {
        let size = 6u64 << 30;
        let map = e820_map(size);
        assert_eq!(map.len(), 3);
        let total: u64 = map.iter().map(|e| e.size).sum();
        // everything except the EBDA/VGA/BIOS hole below 1 MiB is RAM
        assert_eq!(total, size - (HIMEM_START.0 - LOW_RAM_END));
        for e in &map {
            assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let a = initrd_address(128 << 20, 5000, 20 << 20, u64::MAX).unwrap();
        assert_eq!(a.0 % 4096, 0);
        assert!(a.0 + 5000 <= 128 << 20);
        assert!(a.0 >= (128 << 20) - 8192);
        // above the gap the initrd still stays below it
        let a = initrd_address(8 << 30, 5000, 20 << 20, u64::MAX).unwrap();
        assert!(a.0 + 5000 <= MMIO_GAP_START);
        // respects the kernel's limit
        let a = initrd_address(8 << 30, 5000, 20 << 20, 0x3fff_ffff).unwrap();
        assert!(a.0 + 5000 <= 0x4000_0000);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_refused() {
        assert!(initrd_address(32 << 20, 20 << 20, 16 << 20, u64::MAX).is_err());
        assert!(initrd_address(1 << 20, 2 << 20, 0, u64::MAX).is_err());
    }

    #[test]
    fn pvh_start_info_points_at_memmap_cmdline_and_initrd() {
        let m = mem(128 << 20);
        let initrd = Initrd {
            addr: GuestAddress(0x700_0000),
            size: 4096,
        };
        write_pvh_start_info(&m, 128 << 20, Some(initrd)).unwrap();
        let info: hvm_start_info = m.read_obj(PVH_INFO_START).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.cmdline_paddr, CMDLINE_START.0);
        assert_eq!(info.memmap_entries, 2);
        let first: hvm_memmap_table_entry = m.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!(
            (first.addr, first.size, first.type_),
            (0, LOW_RAM_END, E820_RAM)
        );
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x700_0000, 4096));
    }

    #[test]
    fn zero_page_carries_e820_cmdline_and_initrd() {
        let m = mem(128 << 20);
        let initrd = Initrd {
            addr: GuestAddress(0x700_0000),
            size: 4096,
        };
        write_zero_page(
            &m,
            128 << 20,
            Some(setup_header::default()),
            42,
            Some(initrd),
        )
        .unwrap();
        let p: boot_params = m.read_obj(ZERO_PAGE_START).unwrap();
        assert_eq!(p.e820_entries, 2);
        let hdr = p.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START.0 as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        write_zero_page(&m, 128 << 20, None, 0, None).unwrap();
    }
}
