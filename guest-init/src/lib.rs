//! guest-init: PID 1 of a vmm guest.
//!
//! It mounts the root image read-only under a private overlay, switches root, connects to the host
//! over vsock, runs the one command the host asks for, streams its output, reports how it ended and
//! resets the VM. See `init` for the order of things; every other module does one job:
//!
//! - `cmdline`: the `vmm.*` options on the kernel command line
//! - `mounts`: /proc, /sys, /dev, the overlay root, the root switch, /tmp and /run
//! - `vsock`: connecting to the host
//! - `channel`: framed messages over the connection
//! - `timeline`: boot milestones (CLOCK_BOOTTIME)
//! - `spawn`: starting the command (PATH search, user, working directory, exec errors)
//! - `reaper`: noticing and reaping exited children
//! - `relay`: the poll loop between the command's pipes and the connection
//! - `transfer`: unpacking copy-in streams before the command, packing copy-out streams after it
//! - `session`: one run request from start to report (runs over any stream socket, so it is tested
//!   over a Unix socket pair)
//! - `log`: messages to /dev/kmsg
//! - `sys`: small safe wrappers over libc

#![deny(unsafe_op_in_unsafe_fn)]

pub mod channel;
pub mod cmdline;
pub mod init;
pub mod log;
pub mod mounts;
pub mod reaper;
pub mod relay;
pub mod session;
pub mod spawn;
pub mod sys;
pub mod timeline;
pub mod transfer;
pub mod vsock;
