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

/// Turns what happened into the run's [`Verdict`].
pub fn conclude(config: &VmConfig, decision: &Decision, control: Option<&ControlState>) -> Verdict {
    let outcome = control.and_then(|c| c.outcome.clone());
    let (exit_code, status, end, error) = match (decision, outcome) {
        (Decision::Timeout, _) => {
            let secs = config.timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0);
            (
                EXIT_TIMEOUT,
                None,
                EndReason::Timeout,
                Some(format!(
                    "the command timed out after {secs} s; the VM was torn down"
                )),
            )
        }
        (_, Some(Outcome::Exited(status))) => {
            let s = match status {
                ExitStatus::Code(c) => CommandStatus::Code(c),
                ExitStatus::Signal(n) => CommandStatus::Signal(n),
            };
            let copy_errors = control.map(|c| c.copy_out_errors.join("; "));
            match (exit_code_of(status), copy_errors) {
                // the command succeeded but its artifacts did not all arrive: not a success
                (0, Some(errors)) if !errors.is_empty() => (
                    EXIT_VMM_FAILED,
                    Some(s),
                    EndReason::CommandExited,
                    Some(errors),
                ),
                (code, _) => (code, Some(s), EndReason::CommandExited, None),
            }
        }
        (_, Some(Outcome::HostFailed(message))) => (
            EXIT_VMM_FAILED,
            None,
            EndReason::VmmFailed(message.clone()),
            Some(message),
        ),
        (_, Some(Outcome::Failed(kind, message))) => (
            exit_code_of_error(kind),
            None,
            EndReason::CommandNotRun,
            Some(message),
        ),
        (Decision::BootTimeout, _) => {
            let why = format!(
                "the guest never came up: guest-init did not connect within {} s (run with --console to see its kernel log)",
                BOOT_DEADLINE.as_secs()
            );
            (
                EXIT_VMM_FAILED,
                None,
                EndReason::GuestFailed(why.clone()),
                Some(why),
            )
        }
        (Decision::Signal(sig), _) => (
            128 + sig,
            None,
            EndReason::Signal(*sig),
            Some(format!("stopped by signal {sig}; the VM was torn down")),
        ),
        (_, Some(Outcome::Protocol(message))) => (
            EXIT_VMM_FAILED,
            None,
            EndReason::GuestFailed(message.clone()),
            Some(format!("the guest broke the control protocol: {message}")),
        ),
        (Decision::Guest(GuestEnd::Error(e)), None) => (
            EXIT_VMM_FAILED,
            None,
            EndReason::GuestFailed(e.clone()),
            Some(format!("the VM failed: {e}")),
        ),
        // Boot-only: the guest's own reset (reboot=k, or halt/power-off through our kernel patch) is its
        // normal end; a triple fault (KVM shutdown exit) is a crash.
        (Decision::Guest(GuestEnd::Reset), None) if config.command.is_none() => {
            (0, None, EndReason::GuestEnded, None)
        }
        (Decision::Guest(GuestEnd::Shutdown), None) if config.command.is_none() => {
            let why = "the guest crashed: it triple-faulted or halted unexpectedly (run with --console to see its kernel log)".to_string();
            (
                EXIT_VMM_FAILED,
                None,
                EndReason::GuestFailed(why.clone()),
                Some(why),
            )
        }
        (Decision::Guest(end), None) => {
            let connected = control.is_some_and(|c| c.connected_at.is_some());
            let how = match end {
                GuestEnd::Reset => "reset",
                GuestEnd::Shutdown => "triple-faulted (or halted)",
                GuestEnd::Error(_) => "failed",
            };
            let why = if connected {
                format!("the guest {how} before reporting the command's exit status")
            } else {
                format!("the guest never came up: it {how} before guest-init connected (run with --console to see its kernel log)")
            };
            (
                EXIT_VMM_FAILED,
                None,
                EndReason::GuestFailed(why.clone()),
                Some(why),
            )
        }
        (Decision::Command, None) => {
            let why = "the control channel ended without an outcome".to_string();
            (
                EXIT_VMM_FAILED,
                None,
                EndReason::GuestFailed(why.clone()),
                Some(why),
            )
        }
    };
    Verdict {
        exit_code,
        status,
        end,
        error,
    }
}
