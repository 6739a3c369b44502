//! vmm: a microVM monitor that runs one untrusted build command in its own KVM virtual machine.
//!
//! Data flows one way: command line -> [`config::VmConfig`] -> [`builder`] -> [`runner`] (the running
//! VM) -> [`result::RunResult`].

pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod fault_dump;
pub mod guest_ram;
pub mod host_tool;
pub mod image;
pub mod initramfs;
pub mod kernel_file;
pub mod result;
pub mod runner;
pub mod seccomp;
pub mod timeline;
pub mod trace;
pub mod transfer;
pub mod vcpu;
pub mod watchdog;
