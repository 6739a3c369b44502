//! vmm: a microVM monitor that runs one untrusted build command in its own KVM virtual machine.
//!
//! Data flows one way: command line -> [`config::VmConfig`] -> [`builder`] -> running VM -> result.

pub mod devices;
