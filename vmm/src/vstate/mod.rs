//! The KVM state of the VM, apart from the builder that decides what goes into it: the VM itself
//! (memory slots, in-kernel irqchip and PIT, irqfds and ioeventfds: `vm.rs`) and its vCPUs' initial
//! state (CPUID, LAPIC, registers: `vcpu.rs`). Snapshots will save and restore through here.

pub mod vcpu;
pub mod vm;

pub use vm::{KvmVm, VmError};
