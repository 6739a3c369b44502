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

fn read_file(rootfs: &Path, path: &str) -> Result<String, ImageError> {
    let out = crate::host_tool::command("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(rootfs)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            bad(
                path,
                format!("cannot run debugfs (install e2fsprogs) to read it: {e}"),
            )
        })?;
    if !out.status.success() {
        return Err(bad(
            path,
            format!("cannot read it from {}", rootfs.display()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
    fn numeric_users_need_no_image() {
        let missing = Path::new("/nonexistent/image.ext4");
        assert_eq!(resolve_user(missing, "1000:100").unwrap(), (1000, 100));
        assert_eq!(resolve_user(missing, "7").unwrap(), (7, 7));
        assert!(resolve_user(missing, "builder").is_err());
    }
}
