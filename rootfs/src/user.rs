//! The image's `User` as numbers: `uid[:gid]` as is, names through the image's own /etc/passwd and
//! /etc/group (read out of the ext4 image with debugfs, so nothing is mounted), as `docker run` resolves
//! them inside the container.

use std::path::Path;
use std::process::Stdio;

use super::ImageError;

/// Resolves `user` ("name", "uid", "name:group", "uid:gid", ...) against the image at `rootfs`.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32), ImageError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if let (Ok(uid), Some(Ok(gid))) = (u.parse::<u32>(), g.map(str::parse::<u32>)) {
        // numbers only: nothing to look up in the image
        return Ok((uid, gid));
    }
    let passwd = || read_file(rootfs, "/etc/passwd");
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => {
            // a numeric uid keeps the primary group the image's passwd gives it, else its own number
            let gid = passwd()
                .ok()
                .and_then(|p| lookup(&p, |f| f.get(2) == Some(&u), 3))
                .unwrap_or(uid);
            (uid, gid)
        }
        Err(_) => {
            let p = passwd()?;
            let uid = lookup(&p, |f| f.first() == Some(&u), 2).ok_or_else(|| unknown("user", u))?;
            let gid = lookup(&p, |f| f.first() == Some(&u), 3).ok_or_else(|| unknown("user", u))?;
            (uid, gid)
        }
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read_file(rootfs, "/etc/group")?;
                lookup(&groups, |f| f.first() == Some(&g), 2).ok_or_else(|| unknown("group", g))?
            }
        },
    };
    Ok((uid, gid))
}

fn unknown(what: &str, name: &str) -> ImageError {
    bad(
        "its User",
        format!("names {what} {name:?}, which its /etc files do not list"),
    )
}

fn bad(src: &str, why: String) -> ImageError {
    ImageError::BadImage {
        src: src.to_string(),
        why,
    }
}

/// Field `field` (a number) of the first colon-separated line that `matches`.
fn lookup(text: &str, matches: impl Fn(&Vec<&str>) -> bool, field: usize) -> Option<u32> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| matches(f))
        .and_then(|f| f.get(field).and_then(|v| v.parse().ok()))
}

/// The most of an image's /etc/passwd or /etc/group that is read: real ones are a few KiB, and the
/// image (its author) decides how large they are.
const MAX_ETC_FILE: u64 = 4 << 20;

fn read_file(rootfs: &Path, path: &str) -> Result<String, ImageError> {
    let mut debugfs = crate::host_tool::command("debugfs");
    debugfs.arg("-R").arg(format!("cat {path}")).arg(rootfs);
    let tool_error = |e: std::io::Error| {
        bad(
            path,
            format!("cannot run debugfs (install e2fsprogs) to read it: {e}"),
        )
    };
    match read_bounded(debugfs, MAX_ETC_FILE).map_err(tool_error)? {
        Bounded::Output(text) => Ok(text),
        Bounded::Failed => Err(bad(
            path,
            format!("cannot read it from {}", rootfs.display()),
        )),
        Bounded::TooLarge => Err(bad(
            path,
            format!(
                "it is larger than {} MiB in {}, which no real one is",
                MAX_ETC_FILE >> 20,
                rootfs.display()
            ),
        )),
    }
}

/// What a command printed, when it succeeded and printed at most its limit.
#[derive(Debug, PartialEq)]
enum Bounded {
    Output(String),
    Failed,
    /// More than the limit: the command was killed.
    TooLarge,
}

/// Runs `command` and reads at most `limit` bytes of its standard output.
fn read_bounded(mut command: std::process::Command, limit: u64) -> std::io::Result<Bounded> {
    use std::io::Read;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = Vec::new();
    let read = match child.stdout.take() {
        Some(stdout) => stdout.take(limit + 1).read_to_end(&mut out),
        None => Ok(0),
    };
    if read.is_err() || out.len() as u64 > limit {
        // it may be blocked writing the rest: it is of no use any more
        let _ = child.kill();
        let _ = child.wait();
        read?;
        return Ok(Bounded::TooLarge);
    }
    if !child.wait()?.success() {
        return Ok(Bounded::Failed);
    }
    Ok(Bounded::Output(String::from_utf8_lossy(&out).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_fields_of_the_matching_line() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:100::/home/builder:/bin/sh\n";
        assert_eq!(
            lookup(passwd, |f| f.first() == Some(&"builder"), 2),
            Some(1000)
        );
        assert_eq!(
            lookup(passwd, |f| f.first() == Some(&"builder"), 3),
            Some(100)
        );
        assert_eq!(lookup(passwd, |f| f.first() == Some(&"nobody"), 2), None);
    }

    #[test]
    fn an_endless_file_is_cut_off_at_the_limit() {
        // `yes` never ends by itself: the read stops at the limit and the command is killed
        let endless = std::process::Command::new("yes");
        assert_eq!(read_bounded(endless, 1 << 20).unwrap(), Bounded::TooLarge);
        let mut small = std::process::Command::new("echo");
        small.arg("root:x:0:0");
        assert_eq!(
            read_bounded(small, 1 << 20).unwrap(),
            Bounded::Output("root:x:0:0\n".into())
        );
        assert_eq!(
            read_bounded(std::process::Command::new("false"), 1 << 20).unwrap(),
            Bounded::Failed
        );
    }

    #[test]
    fn numeric_users_need_no_image() {
        let missing = Path::new("/nonexistent/image.ext4");
        assert_eq!(resolve_user(missing, "1000:100").unwrap(), (1000, 100));
        assert_eq!(resolve_user(missing, "7").unwrap(), (7, 7));
        assert!(resolve_user(missing, "builder").is_err());
    }
}
