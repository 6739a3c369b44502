//! Guest networking: the egress policy vmm enforces on every frame the guest sends to passt, the
//! `--net-allow` syntax, and the DNS answers the policy learns host names' addresses from.
//!
//! The virtio-net device that carries the frames is in `devices::virtio::net`; this module knows
//! nothing of queues or sockets, so each rule is tested on crafted frames alone.

pub mod allow;
pub mod dns;
pub mod passt;
pub mod policy;
pub mod reply;

#[cfg(test)]
mod tests;

pub use allow::{AllowEntry, AllowError, Target};
pub use policy::{DropReason, NetAddresses, Policy, PolicyCounters};
