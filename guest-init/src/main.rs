//! `/init` of every vmm guest. All the work is in the library (`guest_init::init`).
//!
//! There is no Rust `main`: the standard library's start-up code, run before a Rust `main`, opens
//! `/dev/null` for any of the descriptors 0-2 that is closed and aborts the process when it cannot. As
//! PID 1 started from an initramfs without a console, descriptors 0-2 are closed and `/dev` is not yet
//! mounted, so that abort would kill PID 1 and panic the kernel. The C `main` below skips that start-up
//! code; `guest_init::init::main` mounts `/dev` and then sets up descriptors 0-2 itself. (It also skips
//! std's `SIGPIPE` handling: init ignores `SIGPIPE` itself.)

// (The test build of this binary keeps the harness's main: there is nothing to test here.)
#![cfg_attr(not(test), no_main)]

/// The C entry point, called by the C runtime of the static binary.
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    guest_init::init::main()
}
