//! The devices a vmm guest sees: only what the job needs.

pub mod virtio;
