//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its vCPUs, its
//! IOAPIC and how legacy IRQs are wired to it. Linux finds the floating pointer by scanning the EBDA.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{below_4g, APIC_START, IOAPIC_PINS, IOAPIC_START};

/// Largest vCPU count: APIC IDs 0..MAX_VCPUS, and the IOAPIC takes the next ID.
pub const MAX_VCPUS: u8 = 254;

const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
// family 6, model 15, stepping 11 -- only informational to Linux
const CPU_SIGNATURE: u32 = (6 << 8) | (15 << 4) | 11;
const CPU_FEATURE_FPU: u32 = 1 << 0;
const CPU_FEATURE_APIC: u32 = 1 << 9;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINTSRC: u8 = 3;
const ENTRY_LOCALINTSRC: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conforms to the bus" (ISA: active high, edge).
const IRQ_FLAGS_DEFAULT: u16 = 0;
const ISA_BUS_ID: u8 = 0;

/// The IOAPIC's and the local APIC's addresses, in the MMIO gap below 4 GiB.
const IOAPIC_ADDR: u32 = below_4g(IOAPIC_START);
const APIC_ADDR: u32 = below_4g(APIC_START);
/// The IOAPIC's pins as the table's byte-wide IRQ numbers.
#[allow(clippy::cast_possible_truncation)] // 24 pins
const PINS: u8 = IOAPIC_PINS as u8;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs is more than the MP table can describe ({MAX_VCPUS} at most)")]
    TooManyVcpus(u8),
    #[error("zero vCPUs")]
    NoVcpus,
    #[error("the MP table does not fit in guest memory")]
    Write,
    #[error("the MP table at {0:#x} is not below 4 GiB")]
    Address(u64),
}

/// The bytes of the floating pointer followed by the configuration table, for a table placed at `addr`.
pub fn build(addr: GuestAddress, num_vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_vcpus == 0 {
        return Err(MptableError::NoVcpus);
    }
    if num_vcpus > MAX_VCPUS {
        return Err(MptableError::TooManyVcpus(num_vcpus));
    }
    let ioapic_id = num_vcpus;

    let mut entries = Vec::new();
    for cpu in 0..num_vcpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu); // local APIC ID
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_FPU | CPU_FEATURE_APIC).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..PINS {
        // Every pin 1:1 to its ISA IRQ. KVM's IOAPIC has no 8259 cascade on pin 0: declaring it ExtINT
        // sends Linux's check_timer() down a path that oopses ("ExtINT not setup in hardware").
        entries.extend_from_slice(&[ENTRY_IOINTSRC, INT_TYPE_INT]);
        entries.extend_from_slice(&IRQ_FLAGS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
    }
    // LINT0 is ExtINT, LINT1 NMI, on every local APIC (0xff).
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCALINTSRC, kind]);
        entries.extend_from_slice(&IRQ_FLAGS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, lint]);
    }

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    // The floating pointer holds the table's address in 32 bits.
    let table_addr = addr
        .0
        .checked_add(FLOATING_LEN as u64)
        .and_then(|a| u32::try_from(a).ok())
        .ok_or(MptableError::Address(addr.0))?;
    let entry_count = u16::from(num_vcpus) + 1 + 1 + u16::from(PINS) + 2;
    // 20 bytes per vCPU, at most MAX_VCPUS of them: well inside the 16-bit length
    let table_len = u16::try_from(HEADER_LEN + entries.len())
        .map_err(|_| MptableError::TooManyVcpus(num_vcpus))?;

    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMM     "); // OEM ID
    table.extend_from_slice(b"MICROVM     "); // product ID
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum_byte(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // spec revision 1.4
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    floating[10] = checksum_byte(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `num_vcpus` at `addr`.
pub fn write(mem: &GuestMemoryMmap, addr: GuestAddress, num_vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(addr, num_vcpus)?;
    mem.write_slice(&bytes, addr)
        .map_err(|_| MptableError::Write)
}

/// The byte that makes the sum of `bytes` (with the byte itself) zero modulo 256.
fn checksum_byte(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    // test data is small
    #![allow(clippy::cast_possible_truncation)]

    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_consistent() {
        for n in [1u8, 2, 8, MAX_VCPUS] {
            let addr = GuestAddress(0x9fc00);
            let b = build(addr, n).unwrap();
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[0..16]), 0);
            let table_ptr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
            assert_eq!(table_ptr, addr.0 + 16);
            let table = &b[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, n as usize + 2 + IOAPIC_PINS as usize + 2);
        }
    }

    #[test]
    fn processors_have_sequential_apic_ids_and_one_bsp() {
        let b = build(GuestAddress(0), 4).unwrap();
        let entries = &b[16 + 44..];
        for cpu in 0..4 {
            let e = &entries[cpu * 20..cpu * 20 + 20];
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(e[1], cpu as u8);
            assert_eq!(e[3] & CPU_BSP != 0, cpu == 0);
        }
        // the IOAPIC follows the bus entry and takes the next APIC ID
        let ioapic = &entries[4 * 20 + 8..4 * 20 + 16];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], 4);
    }

    #[test]
    fn fits_below_the_vga_hole() {
        let b = build(GuestAddress(0x9fc00), MAX_VCPUS).unwrap();
        // the EBDA region is 1 KiB; large vCPU counts spill into the hole, which is not RAM for the kernel
        // but is still backed by guest memory
        assert!(0x9fc00 + b.len() as u64 <= 0x10_0000);
        assert!(0x9fc00 + build(GuestAddress(0), 32).unwrap().len() as u64 <= 0xa0000);
    }

    #[test]
    fn bad_vcpu_counts_are_refused() {
        assert!(matches!(
            build(GuestAddress(0), 0),
            Err(MptableError::NoVcpus)
        ));
        assert!(matches!(
            build(GuestAddress(0), 255),
            Err(MptableError::TooManyVcpus(255))
        ));
    }
}
