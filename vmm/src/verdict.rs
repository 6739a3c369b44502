//! The exit-status decision: what happened (the loop's decision, what the control channel learnt)
//! turned into vmm's exit status, the command's status, why the VM ended and, for vmm's own failures,
//! one line for the user. Beside `exit_code.rs`, whose codes it picks.

use vmm_protocol::ExitStatus;

use crate::config::VmConfig;
use crate::control::{ControlState, Outcome};
use crate::exit_code::*;
use crate::lifecycle::{Decision, BOOT_DEADLINE};
use crate::result::{CommandStatus, EndReason};
use crate::vm_end::GuestEnd;

/// How the run ends for the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// vmm's exit status
    pub exit_code: i32,
    /// the command's own status, if it reported one
    pub status: Option<CommandStatus>,
    pub end: EndReason,
    /// one line for the user when vmm (not the command) decided the exit status
    pub error: Option<String>,
}

impl Verdict {
    /// vmm's own failure (125), with its line.
    fn vmm_failed(end: EndReason, line: String) -> Verdict {
        Verdict {
            exit_code: EXIT_VMM_FAILED,
            status: None,
            end,
            error: Some(line),
        }
    }

    /// The guest failed before the command's status arrived: 125, `why` both the reason and the line.
    fn guest_failed(why: String) -> Verdict {
        Verdict::vmm_failed(EndReason::GuestFailed(why.clone()), why)
    }
}

/// Turns what happened into the run's [`Verdict`].
pub fn conclude(config: &VmConfig, decision: &Decision, control: Option<&ControlState>) -> Verdict {
    let outcome = control.and_then(|c| c.outcome.clone());
    match (decision, outcome) {
        (Decision::Timeout, _) => {
            let secs = config.timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0);
            Verdict {
                exit_code: EXIT_TIMEOUT,
                status: None,
                end: EndReason::Timeout,
                error: Some(format!(
                    "the command timed out after {secs} s; the VM was torn down"
                )),
            }
        }
        (_, Some(Outcome::Exited(status))) => command_exited(status, control),
        (_, Some(Outcome::HostFailed(message))) => {
            Verdict::vmm_failed(EndReason::VmmFailed(message.clone()), message)
        }
        (_, Some(Outcome::Failed(kind, message))) => Verdict {
            exit_code: exit_code_of_error(kind),
            status: None,
            end: EndReason::CommandNotRun,
            error: Some(message),
        },
        (Decision::BootTimeout, _) => Verdict::guest_failed(format!(
            "the guest never came up: guest-init did not connect within {} s (run with --console to see its kernel log)",
            BOOT_DEADLINE.as_secs()
        )),
        (Decision::Signal(sig), _) => Verdict {
            exit_code: 128 + sig,
            status: None,
            end: EndReason::Signal(*sig),
            error: Some(format!("stopped by signal {sig}; the VM was torn down")),
        },
        (_, Some(Outcome::Protocol(message))) => Verdict::vmm_failed(
            EndReason::GuestFailed(message.clone()),
            format!("the guest broke the control protocol: {message}"),
        ),
        (Decision::Guest(end), None) => guest_ended(config, end, control),
        (Decision::Command, None) => {
            Verdict::guest_failed("the control channel ended without an outcome".into())
        }
    }
}

/// The command reported its status: it is vmm's, unless a successful command's artifacts did not
/// all arrive.
fn command_exited(status: ExitStatus, control: Option<&ControlState>) -> Verdict {
    let command_status = match status {
        ExitStatus::Code(c) => CommandStatus::Code(c),
        ExitStatus::Signal(n) => CommandStatus::Signal(n),
    };
    let copy_errors = control
        .map(|c| c.copy_out_errors.join("; "))
        .filter(|e| !e.is_empty());
    match (exit_code_of(status), copy_errors) {
        (0, Some(errors)) => Verdict {
            exit_code: EXIT_VMM_FAILED,
            status: Some(command_status),
            end: EndReason::CommandExited,
            error: Some(errors),
        },
        (code, _) => Verdict {
            exit_code: code,
            status: Some(command_status),
            end: EndReason::CommandExited,
            error: None,
        },
    }
}

/// The guest ended without the command's status.
fn guest_ended(config: &VmConfig, end: &GuestEnd, control: Option<&ControlState>) -> Verdict {
    match end {
        GuestEnd::Error(e) => {
            return Verdict::vmm_failed(
                EndReason::GuestFailed(e.clone()),
                format!("the VM failed: {e}"),
            )
        }
        // Boot-only: the guest's own reset (reboot=k, or halt/power-off through our kernel patch) is
        // its normal end; a triple fault (KVM shutdown exit) is a crash.
        GuestEnd::Reset if config.command.is_none() => {
            return Verdict {
                exit_code: 0,
                status: None,
                end: EndReason::GuestEnded,
                error: None,
            }
        }
        GuestEnd::Shutdown if config.command.is_none() => {
            return Verdict::guest_failed(
                "the guest crashed: it triple-faulted or halted unexpectedly (run with --console to see its kernel log)".into(),
            )
        }
        _ => {}
    }
    let connected = control.is_some_and(|c| c.connected_at.is_some());
    let how = match end {
        GuestEnd::Reset => "reset",
        GuestEnd::Shutdown => "triple-faulted (or halted)",
        GuestEnd::Error(_) => "failed",
    };
    Verdict::guest_failed(if connected {
        format!("the guest {how} before reporting the command's exit status")
    } else {
        format!("the guest never came up: it {how} before guest-init connected (run with --console to see its kernel log)")
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use vmm_protocol::ErrorKind;

    use super::*;
    use crate::config::{CommandSpec, KernelFormat};

    fn config(command: bool) -> VmConfig {
        VmConfig {
            kernel: PathBuf::new(),
            kernel_format: KernelFormat::Elf,
            rootfs: PathBuf::new(),
            mem_mib: 128,
            vcpus: 1,
            console: false,
            append: String::new(),
            command: command.then(|| CommandSpec {
                argv: vec!["true".into()],
                env: Vec::new(),
                workdir: "/".into(),
                uid: 0,
                gid: 0,
                transfers: Default::default(),
            }),
            timeout: Some(Duration::from_secs(3)),
            result_file: None,
            trace_file: None,
            scratch_bytes: None,
            allow_slow_host: false,
            net: None,
        }
    }

    fn state(outcome: Outcome, copy_out_errors: &[&str]) -> ControlState {
        ControlState {
            outcome: Some(outcome),
            connected_at: Some(Instant::now()),
            copy_out_errors: copy_out_errors.iter().map(|e| e.to_string()).collect(),
            ..ControlState::default()
        }
    }

    #[test]
    fn the_commands_status_is_vmms_unless_its_artifacts_went_missing() {
        let c = config(true);
        let exited = |code, errors: &[&str]| {
            conclude(
                &c,
                &Decision::Command,
                Some(&state(Outcome::Exited(ExitStatus::Code(code)), errors)),
            )
        };
        let v = exited(3, &[]);
        assert_eq!((v.exit_code, v.status), (3, Some(CommandStatus::Code(3))));
        assert_eq!(v.error, None);
        let v = exited(0, &["copy-out of /out: gone"]);
        assert_eq!(v.exit_code, EXIT_VMM_FAILED);
        assert_eq!(v.error.as_deref(), Some("copy-out of /out: gone"));
        // a failed command keeps its own status
        assert_eq!(exited(2, &["copy-out of /out: gone"]).exit_code, 2);
        let v = conclude(
            &c,
            &Decision::Command,
            Some(&state(Outcome::Exited(ExitStatus::Signal(9)), &[])),
        );
        assert_eq!(v.exit_code, 137);
    }

    #[test]
    fn timeouts_signals_and_vmms_own_failures_have_their_codes() {
        let c = config(true);
        let running = state(Outcome::Exited(ExitStatus::Code(0)), &[]);
        let v = conclude(&c, &Decision::Timeout, Some(&running));
        assert_eq!(
            (v.exit_code, v.end.clone()),
            (EXIT_TIMEOUT, EndReason::Timeout)
        );
        assert!(v.error.is_some_and(|e| e.contains("after 3 s")));
        let v = conclude(&c, &Decision::Signal(15), None);
        assert_eq!((v.exit_code, v.end), (143, EndReason::Signal(15)));
        let not_found = state(Outcome::Failed(ErrorKind::NotFound, "nope".into()), &[]);
        assert_eq!(
            conclude(&c, &Decision::Command, Some(&not_found)).exit_code,
            EXIT_NOT_FOUND
        );
        let v = conclude(&c, &Decision::BootTimeout, None);
        assert_eq!(v.exit_code, EXIT_VMM_FAILED);
        assert!(matches!(v.end, EndReason::GuestFailed(_)));
    }

    #[test]
    fn a_boot_only_run_ends_well_on_reset_and_badly_on_a_triple_fault() {
        let c = config(false);
        let v = conclude(&c, &Decision::Guest(GuestEnd::Reset), None);
        assert_eq!((v.exit_code, v.end), (0, EndReason::GuestEnded));
        let v = conclude(&c, &Decision::Guest(GuestEnd::Shutdown), None);
        assert_eq!(v.exit_code, EXIT_VMM_FAILED);
        assert!(v.error.is_some_and(|e| e.contains("triple-faulted")));
        // with a command, a reset before the status is a failure that says whether init came up
        let v = conclude(&config(true), &Decision::Guest(GuestEnd::Reset), None);
        assert!(v.error.is_some_and(|e| e.contains("never came up")));
    }
}
