//! Host-side phases of a run, as offsets from the moment `vmm` started.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Timeline {
    start: Instant,
    marks: Vec<(String, Duration)>,
}

impl Timeline {
    pub fn new(start: Instant) -> Self {
        Timeline {
            start,
            marks: Vec::new(),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// Records that `phase` ended now.
    pub fn mark(&mut self, phase: &str) {
        self.marks.push((phase.to_string(), self.start.elapsed()));
    }

    /// Records that `phase` ended at `at`.
    pub fn mark_at(&mut self, phase: &str, at: Instant) {
        self.marks
            .push((phase.to_string(), at.saturating_duration_since(self.start)));
    }

    pub fn marks(&self) -> &[(String, Duration)] {
        &self.marks
    }

    /// When `phase` was marked, if it was.
    pub fn get(&self, phase: &str) -> Option<Duration> {
        self.marks.iter().find(|(p, _)| p == phase).map(|(_, d)| *d)
    }
}
