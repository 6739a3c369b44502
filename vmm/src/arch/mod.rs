//! x86_64 specifics of booting a Linux guest: the guest physical memory map, boot parameters and e820,
//! the MP table that announces vCPUs and the IOAPIC, CPUID and initial register state.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
