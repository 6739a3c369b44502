//! virtio-vsock (placeholder: being written).
