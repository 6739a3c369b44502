//! The devices a vmm guest sees: only what the job needs.

pub mod legacy;
pub mod virtio;
