//! Initial register state of the boot vCPU for the two entry paths.
//!
//! PVH (ELF vmlinux with a PVH note): 32-bit protected mode, paging off, flat segments, %ebx pointing at
//! `hvm_start_info`. Linux boot protocol (bzImage): 64-bit long mode on identity-mapped page tables,
//! %rsi pointing at the zero page.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit PVH entry point of an uncompressed vmlinux.
    Pvh,
    /// 64-bit entry of the Linux boot protocol (bzImage: startup_64 at load address + 0x200).
    Linux64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT, IDT or page tables into guest memory")]
    Write,
}

/// A GDT entry from its flags, base and limit (Intel SDM vol. 3, 3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The KVM segment for GDT `entry` at `index`.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) as u32) | (((entry >> 32) & 0xf_0000) as u32);
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base,
        // a page-granular limit counts 4 KiB units
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// The boot GDT: null, code, data, TSS. The code segment is 32-bit for PVH and 64-bit for Linux64.
pub fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff), // 32-bit, exec/read, accessed
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit (L=1, D=0)
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data, read/write, accessed
        gdt_entry(0x808b, 0, 0xfffff), // TSS, busy 32-bit
    ]
}

/// Writes the GDT, the empty IDT and, for Linux64, the page tables; returns the special registers.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let gdt = boot_gdt(mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, BOOT_GDT_START.unchecked_add(i as u64 * 8))
            .map_err(|_| RegsError::Write)?;
    }
    mem.write_obj(0u64, BOOT_IDT_START)
        .map_err(|_| RegsError::Write)?;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START.0;
    // 4 entries of 8 bytes: the limit is 31
    #[allow(clippy::cast_possible_truncation)]
    let gdt_limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.gdt.limit = gdt_limit;
    sregs.idt.base = BOOT_IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START.0;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// Identity-maps the first 1 GiB with 2 MiB pages: enough for the kernel's early code.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let w = |val: u64, addr: GuestAddress| mem.write_obj(val, addr).map_err(|_| RegsError::Write);
    w(PDPTE_START.0 | PRESENT_RW, PML4_START)?;
    w(PDE_START.0 | PRESENT_RW, PDPTE_START)?;
    for i in 0..512u64 {
        w(
            (i << 21) | PRESENT_RW | PAGE_SIZE_2M,
            PDE_START.unchecked_add(i * 8),
        )?;
    }
    Ok(())
}

/// The general-purpose registers at the kernel's entry point.
pub fn boot_regs(mode: EntryMode, entry: GuestAddress) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = PVH_INFO_START.0,
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START.0;
        }
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = boot_gdt(EntryMode::Pvh);
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!(
            (cs.base, cs.limit, cs.selector, cs.type_),
            (0, 0xffff_ffff, 8, 0xb)
        );
        assert_eq!(
            (cs.present, cs.db, cs.l, cs.g, cs.s, cs.unusable),
            (1, 1, 0, 1, 1, 0)
        );
        let cs64 = segment_from_gdt(boot_gdt(EntryMode::Linux64)[1], 1);
        assert_eq!((cs64.l, cs64.db), (1, 0));
        let ds = segment_from_gdt(gdt[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.db), (16, 3, 1));
        let null = segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn pvh_state_is_protected_mode_without_paging() {
        let m = mem();
        let s = setup_sregs(&m, EntryMode::Pvh, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer, 0);
        assert_eq!(s.gdt.base, BOOT_GDT_START.0);
        let gdt1: u64 = m.read_obj(BOOT_GDT_START.unchecked_add(8)).unwrap();
        assert_eq!(gdt1, boot_gdt(EntryMode::Pvh)[1]);
        let r = boot_regs(EntryMode::Pvh, GuestAddress(0x100_0000));
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, PVH_INFO_START.0, 2));
    }

    #[test]
    fn linux64_state_is_long_mode_on_identity_tables() {
        let m = mem();
        let s = setup_sregs(&m, EntryMode::Linux64, kvm_sregs::default()).unwrap();
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START.0);
        let pml4: u64 = m.read_obj(PML4_START).unwrap();
        assert_eq!(pml4, PDPTE_START.0 | 3);
        let pde5: u64 = m.read_obj(PDE_START.unchecked_add(5 * 8)).unwrap();
        assert_eq!(pde5, (5 << 21) | 0x83);
        let r = boot_regs(EntryMode::Linux64, GuestAddress(0x10_0200));
        assert_eq!(r.rsi, ZERO_PAGE_START.0);
    }
}
