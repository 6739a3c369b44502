//! vmm's exit status, as `docker run` sets it: the command's own status, 128+N for a command killed by
//! signal N, and a few codes of vmm's own. A leaf: every module that ends the process uses it.

use vmm_protocol::{ErrorKind, ExitStatus};

/// `vmm` itself failed: bad arguments, no usable /dev/kvm, bad image or kernel, guest never came up.
pub const EXIT_VMM_FAILED: i32 = 125;
/// `--timeout` fired (as `timeout(1)`).
pub const EXIT_TIMEOUT: i32 = 124;
/// The command could not be executed.
pub const EXIT_CANNOT_RUN: i32 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: i32 = 127;

/// vmm's exit status for a command's status: its code, or 128+N for signal N.
pub fn exit_code_of(status: ExitStatus) -> i32 {
    match status {
        ExitStatus::Code(c) => c & 0xff,
        ExitStatus::Signal(s) => 128 + (s & 0x7f),
    }
}

pub fn exit_code_of_error(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::NotFound => EXIT_NOT_FOUND,
        ErrorKind::NotExecutable => EXIT_CANNOT_RUN,
        ErrorKind::Setup => EXIT_VMM_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_docker_run() {
        assert_eq!(exit_code_of(ExitStatus::Code(0)), 0);
        assert_eq!(exit_code_of(ExitStatus::Code(255)), 255);
        assert_eq!(exit_code_of(ExitStatus::Code(256 + 7)), 7);
        assert_eq!(exit_code_of(ExitStatus::Signal(9)), 137);
        assert_eq!(exit_code_of(ExitStatus::Signal(15)), 143);
        assert_eq!(exit_code_of_error(ErrorKind::NotFound), 127);
        assert_eq!(exit_code_of_error(ErrorKind::NotExecutable), 126);
        assert_eq!(exit_code_of_error(ErrorKind::Setup), 125);
    }
}
