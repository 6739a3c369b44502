//! The `vmm.*` options on the kernel command line (/proc/cmdline). Unknown keys are ignored.
//!
//! - `vmm.tmpfs_size=SIZE`: the size cap of the tmpfs that holds the overlay's upper layer (all the
//!   writes the command makes to the root file system) and of /tmp. SIZE is what tmpfs takes:
//!   a number of bytes with an optional k, m, g suffix, or a percentage of RAM (`50%`). Default 50%.
//! - `vmm.scratch=vdX`: the VM has a scratch disk (an ext4 file system the host made, deleted when the
//!   VM ends): it holds the upper layer and /tmp instead of the tmpfs, for builds that write more than
//!   memory holds.

/// The tmpfs size cap when the command line names none: tmpfs's own default, spelt out.
pub const DEFAULT_TMPFS_SIZE: &str = "50%";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Validated: safe to put into a mount option string.
    pub tmpfs_size: String,
    /// The scratch disk's device node, e.g. `/dev/vdb`.
    pub scratch: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tmpfs_size: DEFAULT_TMPFS_SIZE.to_string(),
            scratch: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("reading /proc/cmdline: {0}")]
    Read(String),
    #[error(
        "invalid vmm.tmpfs_size={0:?} on the kernel command line: expected a non-zero number of bytes \
         with an optional k, m or g suffix, or a percentage such as 50%"
    )]
    TmpfsSize(String),
    #[error(
        "invalid vmm.scratch={0:?} on the kernel command line: expected a disk name such as vdb"
    )]
    Scratch(String),
}

/// Reads and parses /proc/cmdline (/proc must be mounted).
pub fn read() -> Result<Options, CmdlineError> {
    let raw = std::fs::read("/proc/cmdline").map_err(|e| CmdlineError::Read(e.to_string()))?;
    parse(&String::from_utf8_lossy(&raw))
}

/// Parses a kernel command line. The last occurrence of a key wins, as in the kernel.
pub fn parse(cmdline: &str) -> Result<Options, CmdlineError> {
    let mut opts = Options::default();
    for word in words(cmdline) {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, v),
            None => (word.as_str(), ""),
        };
        if key == "vmm.tmpfs_size" {
            if !valid_size(value) {
                return Err(CmdlineError::TmpfsSize(value.to_string()));
            }
            opts.tmpfs_size = value.to_string();
        } else if key == "vmm.scratch" {
            let valid = value.len() >= 3
                && value.starts_with("vd")
                && value[2..].bytes().all(|b| b.is_ascii_lowercase());
            if !valid {
                return Err(CmdlineError::Scratch(value.to_string()));
            }
            opts.scratch = Some(format!("/dev/{value}"));
        }
    }
    Ok(opts)
}

/// Splits on whitespace outside double quotes and drops the quotes, as the kernel does
/// (`key="a b"` is the word `key=a b`).
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// Digits with an optional single k/m/g/t (either case) or % suffix, not zero (tmpfs reads
/// `size=0` as "no limit", which is not what anyone asking for a cap means). Anything else,
/// a comma above all, could inject other mount options.
fn valid_size(v: &str) -> bool {
    let digits = match v.char_indices().last() {
        Some((i, c)) if "kKmMgGtT%".contains(c) => &v[..i],
        _ => v,
    };
    !digits.is_empty()
        && digits.len() <= 20
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.bytes().any(|b| b != b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_disk_names_a_virtio_disk_or_is_refused() {
        assert_eq!(
            parse("vmm.scratch=vdb").unwrap().scratch.as_deref(),
            Some("/dev/vdb")
        );
        assert_eq!(parse("quiet").unwrap().scratch, None);
        for bad in ["sda", "vd", "vdb/../x", "vdB", "vdb,ro"] {
            assert!(parse(&format!("vmm.scratch={bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_when_absent() {
        let o = parse("console=ttyS0 reboot=k panic=-1 rdinit=/init quiet\n").unwrap();
        assert_eq!(o.tmpfs_size, "50%");
        assert_eq!(parse("").unwrap(), Options::default());
    }

    #[test]
    fn reads_tmpfs_size_and_ignores_unknown_keys() {
        let o = parse("quiet vmm.tmpfs_size=512m vmm.unknown=1 vmm.flag foo=bar\n").unwrap();
        assert_eq!(o.tmpfs_size, "512m");
        assert_eq!(parse("vmm.tmpfs_size=25%").unwrap().tmpfs_size, "25%");
        assert_eq!(
            parse("vmm.tmpfs_size=1048576").unwrap().tmpfs_size,
            "1048576"
        );
        assert_eq!(parse("vmm.tmpfs_size=2G").unwrap().tmpfs_size, "2G");
    }

    #[test]
    fn last_occurrence_wins_and_quotes_are_dropped() {
        let o = parse("vmm.tmpfs_size=1g vmm.tmpfs_size=\"2g\"").unwrap();
        assert_eq!(o.tmpfs_size, "2g");
        assert_eq!(words(r#"a "b c" d="e f"g"#), vec!["a", "b c", "d=e fg"]);
    }

    #[test]
    fn bad_sizes_are_refused() {
        for bad in [
            "",
            "0",
            "0%",
            "abc",
            "1x",
            "1,mode=777",
            "1g,nr_inodes=1",
            "-1",
            "1gg",
            "%",
        ] {
            let line = format!("quiet vmm.tmpfs_size={bad}");
            assert_eq!(
                parse(&line),
                Err(CmdlineError::TmpfsSize(bad.to_string())),
                "{bad:?}"
            );
        }
        assert!(parse("vmm.tmpfs_size").is_err());
    }
}
