//! Boot milestones: recorded with their CLOCK_BOOTTIME time when reached, sent to the host once there
//! is a connection (the ones before it right after Hello).

use std::io;

use vmm_protocol::{Message, Milestone, TIMESTAMP_PORT};

use crate::channel::Channel;
use crate::sys;

#[derive(Debug, Default)]
pub struct Timeline {
    marks: Vec<(Milestone, u64)>,
    sent: usize,
    /// Also stamp each milestone on the VMM's timestamp port (only as PID 1 in a vmm guest).
    port: bool,
}

impl Timeline {
    pub fn new() -> Self {
        Self::default()
    }

    /// A timeline that also writes each milestone to the VMM's timestamp port, so the host stamps it
    /// with its own clock at the moment it is reached.
    pub fn with_timestamp_port() -> Self {
        Timeline {
            port: sys::enable_port(TIMESTAMP_PORT),
            ..Self::default()
        }
    }

    /// Records `m` as reached now.
    pub fn mark(&mut self, m: Milestone) {
        self.mark_at(m, sys::boottime_ns());
    }

    /// Records `m` as reached at `boottime_ns`.
    pub fn mark_at(&mut self, m: Milestone, boottime_ns: u64) {
        if self.port {
            sys::outb(TIMESTAMP_PORT, m as u8);
        }
        self.marks.push((m, boottime_ns));
    }

    /// Sends every milestone not sent yet, in the order reached.
    pub fn flush(&mut self, chan: &mut Channel) -> io::Result<()> {
        while let Some(&(milestone, boottime_ns)) = self.marks.get(self.sent) {
            chan.send(&Message::Milestone {
                milestone,
                boottime_ns,
            })?;
            self.sent += 1;
        }
        Ok(())
    }

    pub fn marks(&self) -> &[(Milestone, u64)] {
        &self.marks
    }
}
