//! vmm: a microVM monitor that runs one untrusted build command in its own KVM virtual machine.
//!
//! Data flows one way: command line -> [`config::VmConfig`] -> [`builder`] -> [`runner`] (the running
//! VM) -> [`result::RunResult`].

pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod copy_sandbox;
pub mod device_manager;
pub mod devices;
pub mod exit_code;
pub mod fault_dump;
pub mod guest_ram;
pub mod initramfs;
pub mod kernel_file;
pub mod lifecycle;
pub mod net;
pub mod output_file;
pub mod printk;
pub mod report;
pub mod result;
pub mod runner;
pub mod seccomp;
pub mod timeline;
pub mod trace;
pub mod transfer;
pub mod vcpu;
pub mod verdict;
pub mod vm_end;
pub mod vstate;
pub mod watchdog;
