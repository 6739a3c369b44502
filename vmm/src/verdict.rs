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
