//! Where everything lives in guest physical memory.
//!
//! RAM starts at 0. The 32-bit MMIO gap below 4 GiB holds the virtio-mmio windows, the IOAPIC and the
//! local APIC; RAM that does not fit below the gap continues at 4 GiB.

use vm_memory::GuestAddress;

/// End of the low RAM that the e820 map reports below the EBDA; the APs' real-mode trampoline and the
/// boot structures below live here.
pub const LOW_RAM_END: u64 = 0x9fc00;
/// The GDT used by the boot vCPU's initial segment state (4 entries).
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// An empty IDT: interrupts stay off until the kernel installs its own.
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// The Linux boot protocol's zero page (`struct boot_params`).
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack of the boot vCPU on the 64-bit Linux boot path.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit Linux boot path: PML4, PDPT, PD.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// The kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// x86 Linux 6.1's COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer and configuration table, in the EBDA where Linux scans for them.
pub const MPTABLE_START: GuestAddress = GuestAddress(LOW_RAM_END);
/// Where the kernel's high memory starts: bzImage's protected-mode code is loaded here.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

/// The 32-bit MMIO gap: [MMIO_GAP_START, 4 GiB).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// The virtio-mmio windows, one page each, from the start of the gap.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// The TSS that KVM needs for real-mode emulation on Intel, three pages just below the BIOS area.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Legacy IRQ of the first serial port.
pub const SERIAL_IRQ: u32 = 4;
/// IRQs handed to virtio devices, in order.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The IOAPIC's pins: GSIs 0..IOAPIC_PINS.
pub const IOAPIC_PINS: u32 = 24;

/// The guest RAM regions for `mem_size` bytes: below the MMIO gap, and the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    // usize is 64 bits on x86_64 and --mem is bounded by the config: a length that did not fit the
    // address space would saturate, and mapping it would fail.
    let len = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), len(mem_size))]
    } else {
        vec![
            (GuestAddress(0), len(MMIO_GAP_START)),
            (GuestAddress(MMIO_GAP_END), len(mem_size - MMIO_GAP_START)),
        ]
    }
}

/// A layout address below 4 GiB as the 32-bit field of a boot structure (MP table, zero page). For
/// constants only: in a const item an address at or above 4 GiB fails the build.
pub const fn below_4g(addr: u64) -> u32 {
    assert!(
        addr <= u32::MAX as u64,
        "a 32-bit boot field takes an address below 4 GiB"
    );
    #[allow(clippy::cast_possible_truncation)] // checked just above
    let low = addr as u32;
    low
}

#[cfg(test)]
mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_regions(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(1 << 32),
                ((4u64 << 30) - MMIO_GAP_START) as usize
            )
        );
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let mut spans = [
            (BOOT_GDT_START.0, 32),
            (BOOT_IDT_START.0, 8),
            (PVH_INFO_START.0, 0x1000),
            (ZERO_PAGE_START.0, 0x1000),
            (PML4_START.0, 0x1000),
            (PDPTE_START.0, 0x1000),
            (PDE_START.0, 0x1000),
            (CMDLINE_START.0, CMDLINE_MAX_SIZE as u64),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:x?}");
        }
        assert!(CMDLINE_START.0 + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START.0);
    }
}
