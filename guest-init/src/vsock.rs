//! Connecting to the host: an AF_VSOCK stream to CID 2 (the host), retried briefly while the
//! virtio-vsock device may still be probing, bounded by a deadline.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::sys::{self, describe};

#[derive(Debug, thiserror::Error)]
#[error("connecting to the host over vsock (CID {cid}, port {port}) failed after {attempts} attempt(s): {}", describe(.err))]
pub struct ConnectError {
    pub cid: u32,
    pub port: u32,
    pub attempts: u32,
    #[source]
    pub err: io::Error,
}

/// Connects to the host's `port`, retrying errors that mean "not yet" until `deadline` has passed.
/// The socket is blocking (writes block while the host does not read: that is the backpressure).
pub fn connect(port: u32, deadline: Duration) -> Result<OwnedFd, ConnectError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match connect_once(libc::VMADDR_CID_HOST, port) {
            Ok(fd) => return Ok(fd),
            Err(err) if retriable(&err) && start.elapsed() + delay < deadline => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(100));
            }
            Err(err) => {
                return Err(ConnectError {
                    cid: libc::VMADDR_CID_HOST,
                    port,
                    attempts,
                    err,
                })
            }
        }
    }
}

/// Errors that a device still probing, or a host listener not yet up, can give.
fn retriable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::ENODEV
                | libc::ETIMEDOUT
                | libc::ECONNREFUSED
                | libc::ECONNRESET
                | libc::EAGAIN
                | libc::EINTR
                | libc::ENETUNREACH
                | libc::EHOSTUNREACH
                | libc::EAFNOSUPPORT
        )
    )
}

fn connect_once(cid: u32, port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes plain integers and returns a new descriptor or -1.
    let raw = sys::cvt(unsafe {
        libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
    })?;
    // SAFETY: `raw` is a fresh descriptor owned by nothing else.
    let fd = sys::above_stdio(unsafe { OwnedFd::from_raw_fd(raw) })?;
    // SAFETY: an all-zero sockaddr_vm is valid; the fields that matter are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    // AF_VSOCK is 40: it fits the u16 family field.
    #[allow(clippy::cast_possible_truncation)]
    let family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_family = family;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // sockaddr_vm is 16 bytes.
    #[allow(clippy::cast_possible_truncation)]
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes that outlives the call.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast::<libc::sockaddr>(),
            len,
        )
    };
    sys::cvt(r)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_errors_are_retried_others_are_not() {
        for e in [libc::ENODEV, libc::ETIMEDOUT, libc::ECONNREFUSED] {
            assert!(retriable(&io::Error::from_raw_os_error(e)));
        }
        for e in [libc::EACCES, libc::EINVAL, libc::EPERM] {
            assert!(!retriable(&io::Error::from_raw_os_error(e)));
        }
    }
}
