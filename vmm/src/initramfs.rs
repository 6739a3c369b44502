//! The initramfs that carries guest-init: a newc cpio archive built in memory at start-up, so that any
//! root file system image works unchanged and nothing has to be installed into images.

/// guest-init, built statically by build.rs and embedded in the vmm binary.
pub static GUEST_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-init"));

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// One archive member.
enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, u32, &'a [u8]),
    CharDev(&'a str, u32, u32),
}

/// The archive: `/init` (mode 0755) and the directories and device nodes it needs before devtmpfs is up.
pub fn build(init: &[u8]) -> Vec<u8> {
    let entries = [
        Entry::Dir("dev"),
        Entry::CharDev("dev/console", 5, 1),
        Entry::CharDev("dev/null", 1, 3),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::Dir("mnt"),
        Entry::Dir("tmp"),
        Entry::File("init", 0o755, init),
    ];
    let mut out = Vec::with_capacity(init.len() + 4096);
    for (ino, entry) in entries.iter().enumerate() {
        let (name, mode, rdev, data): (&str, u32, (u32, u32), &[u8]) = match entry {
            Entry::Dir(n) => (n, S_IFDIR | 0o755, (0, 0), &[]),
            Entry::File(n, perm, d) => (n, S_IFREG | perm, (0, 0), d),
            Entry::CharDev(n, major, minor) => (n, S_IFCHR | 0o600, (*major, *minor), &[]),
        };
        push_member(&mut out, ino as u32 + 1, name, mode, rdev, data);
    }
    push_member(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    // The kernel reads the archive in 512-byte blocks.
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

fn push_member(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // checksum (newc has none)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks a newc archive, returning (name, mode, data) of each member.
    fn parse(mut a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap()
        };
        let total = a.len();
        loop {
            assert_eq!(&a[..6], b"070701");
            let mode = field(a, 1);
            let size = field(a, 6) as usize;
            let namesize = field(a, 11) as usize;
            let name = String::from_utf8(a[110..110 + namesize - 1].to_vec()).unwrap();
            let data_start = (110 + namesize).next_multiple_of(4);
            let data = a[data_start..data_start + size].to_vec();
            let consumed = (data_start + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
            out.push((name, mode, data));
            a = &a[consumed..];
        }
        assert_eq!(total % 512, 0);
        out
    }

    #[test]
    fn archive_holds_init_with_its_bytes_and_mode() {
        let init = b"\x7fELF fake init binary, odd length".to_vec();
        let members = parse(&build(&init));
        let (_, mode, data) = members.iter().find(|(n, ..)| n == "init").unwrap();
        assert_eq!(*mode, S_IFREG | 0o755);
        assert_eq!(data, &init);
        assert!(members
            .iter()
            .any(|(n, m, _)| n == "dev/console" && m & S_IFCHR != 0));
        assert!(members
            .iter()
            .any(|(n, m, _)| n == "proc" && m & S_IFDIR != 0));
    }
}
