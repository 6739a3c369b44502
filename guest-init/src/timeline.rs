//! Boot milestones: recorded with their CLOCK_BOOTTIME time when reached, sent to the host once there
//! is a connection (the ones before it right after Hello).

use std::io;

use vmm_protocol::{Message, Milestone};

use crate::channel::Channel;
use crate::sys;

#[derive(Debug, Default)]
pub struct Timeline {
    marks: Vec<(Milestone, u64)>,
    sent: usize,
}

impl Timeline {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `m` as reached now.
    pub fn mark(&mut self, m: Milestone) {
        self.mark_at(m, sys::boottime_ns());
    }

    /// Records `m` as reached at `boottime_ns`.
    pub fn mark_at(&mut self, m: Milestone, boottime_ns: u64) {
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
