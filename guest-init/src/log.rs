//! Messages for whoever looks at the guest's kernel log (`vmm --console` shows them).
//!
//! Lines go to /dev/kmsg once it is open: the write never blocks and never fails init, with or without
//! a console. Errors are logged at KERN_ERR so that they still reach the console under `quiet`. Before
//! /dev/kmsg is open (and in tests) lines go to descriptor 2, errors ignored.

use std::sync::atomic::{AtomicI32, Ordering};

use crate::sys;

static KMSG: AtomicI32 = AtomicI32::new(-1);

/// Opens /dev/kmsg (after /dev is mounted). Failure leaves logging on descriptor 2.
pub fn open_kmsg() {
    let flags = libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;
    // SAFETY: the path is a NUL-terminated literal; open returns a descriptor or -1.
    let fd = unsafe { libc::open(c"/dev/kmsg".as_ptr(), flags) };
    if fd >= 0 {
        // never above-stdio-moved: init has already filled 0-2 before opening this
        let old = KMSG.swap(fd, Ordering::Relaxed);
        if old >= 0 {
            // SAFETY: `old` was opened above by an earlier call and is owned by this module only.
            unsafe { libc::close(old) };
        }
    }
}

pub fn error(msg: &str) {
    emit(3, msg);
}

pub fn warn(msg: &str) {
    emit(4, msg);
}

pub fn info(msg: &str) {
    emit(6, msg);
}

fn emit(level: u8, msg: &str) {
    let kmsg = KMSG.load(Ordering::Relaxed);
    // one record per line: /dev/kmsg takes one record per write
    for line in msg.lines().filter(|l| !l.is_empty()) {
        let record = if kmsg >= 0 {
            format!("<{level}>guest-init: {line}\n")
        } else {
            format!("guest-init: {line}\n")
        };
        let fd = if kmsg >= 0 { kmsg } else { 2 };
        // best effort: a log line must never fail or block init
        let _ = sys::write(fd, record.as_bytes());
    }
}
