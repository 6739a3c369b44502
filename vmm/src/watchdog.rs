//! `--timeout`'s backstop. The event loop's timer ends a run cleanly when the time is up, but only a
//! thread that reaches the loop can act on it: the steps before it (importing an image, reading the
//! image's passwd with debugfs, building the VM) and a thread stuck in a blocking call (a full pipe, a
//! file system that stopped answering) are beyond it. The watchdog is a thread of its own that sleeps
//! until the deadline plus [`GRACE`] and then ends the process with 124, so `vmm --timeout T` always
//! ends: the kernel takes the VM down with the process, which is the teardown that cannot fail.

use std::time::{Duration, Instant};

use crate::exit_code::EXIT_TIMEOUT;
use crate::seccomp::{self, Thread};

/// How long after the deadline the clean path has to finish before the watchdog ends the process. The
/// clean path takes milliseconds: a timeout ends the run without the grace periods that signals get.
pub const GRACE: Duration = Duration::from_secs(5);

/// A wake-up this late means the process did not run, rather than that it was stuck.
const OVERSLEPT: Duration = Duration::from_secs(1);

const LINE: &[u8] =
    b"vmm: still running 5 s after --timeout expired (stuck where the timeout cannot reach); ended it\n";

/// Starts the watchdog for a run that must be over at `deadline`.
pub fn start(deadline: Instant) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("watchdog".into())
        .stack_size(64 << 10)
        .spawn(move || {
            seccomp::apply_or_exit(Thread::Watchdog);
            let mut end = deadline + GRACE;
            let mut extended = false;
            loop {
                let now = Instant::now();
                if now >= end {
                    // Woken much later than asked: the whole process was stopped (SIGSTOP, a frozen
                    // cgroup), so the clean path had no time either. Give it its grace once more.
                    if !extended && now - end > OVERSLEPT {
                        extended = true;
                        end = now + GRACE;
                        continue;
                    }
                    break;
                }
                std::thread::sleep(end - now);
            }
            end_process()
        })
        .map(drop)
}

/// Says why on stderr if that cannot block (stderr may be the very pipe that nobody reads), then ends
/// the process with every thread in it. No `--result` is written: the thread that would write it is the
/// one that is stuck.
fn end_process() -> ! {
    // The last resort if even the write below blocks (another thread refilled the pipe after the poll,
    // or stderr is a file on a file system that stopped answering): SIGALRM's default action ends the
    // process a second later, with status 142 instead of 124.
    // SAFETY: alarm only arms a timer of this process.
    unsafe { libc::alarm(1) };
    let mut stderr = libc::pollfd {
        fd: libc::STDERR_FILENO,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd, ours, for the duration of the call; a timeout of 0 never blocks.
    let ready =
        unsafe { libc::poll(&mut stderr, 1, 0) } == 1 && stderr.revents & libc::POLLOUT != 0;
    if ready {
        // A pipe that polls writable has room for a page, and the line is shorter: it does not block.
        // SAFETY: LINE is a valid buffer of LINE.len() bytes; fd 2 is ours.
        unsafe { libc::write(libc::STDERR_FILENO, LINE.as_ptr().cast(), LINE.len()) };
    }
    // SAFETY: _exit ends the process at once; nothing of ours needs to run first (the kernel frees the
    // VM, its memory and every descriptor, and the result file is not written: 124 says what happened).
    unsafe { libc::_exit(EXIT_TIMEOUT) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_grace_it_waited() {
        let line = std::str::from_utf8(LINE).expect("utf-8");
        assert!(line.contains(&format!(" {} s ", GRACE.as_secs())), "{line}");
        assert!(line.ends_with('\n') && line.lines().count() == 1, "{line}");
    }
}
