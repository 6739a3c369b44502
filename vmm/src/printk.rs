//! The guest kernel's console output as printk lines with their timestamps, for the trace: fed by the
//! serial device (with `--console`), read by `trace.rs`. Bounded: a chatty guest cannot grow it.

/// Splits console output into lines and keeps each printk line with its timestamp.
#[derive(Debug, Default)]
pub struct PrintkLog {
    partial: Vec<u8>,
    lines: Vec<(f64, String)>,
}

/// Bounds the lines kept for the trace (a chatty guest must not grow us without end).
const MAX_PRINTK_LINES: usize = 4096;
const MAX_LINE: usize = 512;

impl PrintkLog {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                if let Some(entry) = parse_printk(&line) {
                    if self.lines.len() < MAX_PRINTK_LINES {
                        self.lines.push(entry);
                    }
                }
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
    }

    pub fn lines(&self) -> &[(f64, String)] {
        &self.lines
    }
}

/// "[    1.234567] text" -> (1.234567, "text").
fn parse_printk(line: &str) -> Option<(f64, String)> {
    let line = line.trim_end_matches('\r');
    let rest = line.strip_prefix('[')?;
    let (stamp, text) = rest.split_once(']')?;
    let secs: f64 = stamp.trim().parse().ok()?;
    Some((secs, text.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printk_lines_are_parsed_and_others_skipped() {
        let mut log = PrintkLog::default();
        log.feed(
            b"[    0.123456] Linux version 6.1\r\nplain line\n[   1.5] Run /init as init proc",
        );
        log.feed(b"ess\n[bad] x\n");
        assert_eq!(
            log.lines(),
            [
                (0.123456, "Linux version 6.1".to_string()),
                (1.5, "Run /init as init process".to_string())
            ]
        );
    }
}
