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
    let mut out = Vec::with_capacity(size(init));
    emit(init, |piece| {
        out.extend_from_slice(piece);
        Ok::<(), std::convert::Infallible>(())
    })
    .unwrap_or_else(|never| match never {});
    out
}

/// The size of [`build`]'s archive, without building it.
pub fn size(init: &[u8]) -> usize {
    let mut len = 0;
    emit(init, |piece| {
        len += piece.len();
        Ok::<(), std::convert::Infallible>(())
    })
    .unwrap_or_else(|never| match never {});
    len
}

/// Hands the archive to `sink` piece by piece, in order: the guest's copy is written straight into its
/// memory, with no second copy of guest-init (a megabyte) on our heap.
pub fn emit<E>(init: &[u8], mut sink: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
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
    let mut written = 0;
    for (ino, entry) in (1u32..).zip(&entries) {
        let (name, mode, rdev, data): (&str, u32, (u32, u32), &[u8]) = match entry {
            Entry::Dir(n) => (n, S_IFDIR | 0o755, (0, 0), &[]),
            Entry::File(n, perm, d) => (n, S_IFREG | perm, (0, 0), d),
            Entry::CharDev(n, major, minor) => (n, S_IFCHR | 0o600, (*major, *minor), &[]),
        };
        written += push_member(&mut sink, ino, name, mode, rdev, data)?;
    }
    written += push_member(&mut sink, 0, "TRAILER!!!", 0, (0, 0), &[])?;
    // The kernel reads the archive in 512-byte blocks.
    sink(&ZEROS[..written.next_multiple_of(512) - written])
}

/// Padding: the most any one pad needs is 511 bytes.
static ZEROS: [u8; 512] = [0; 512];

/// One member: header, name, padding, data, padding. Returns how many bytes that was.
fn push_member<E>(
    put: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ino: u32,
    name: &str,
    mode: u32,
    rdev: (u32, u32),
    data: &[u8],
) -> Result<usize, E> {
    let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        field(data.len()),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        field(name.len() + 1),
        0, // checksum (newc has none)
    ];
    // 110 bytes of header, then the NUL-terminated name, padded to 4 bytes with the header
    let mut head = Vec::with_capacity(HEADER_LEN + name.len() + 4);
    head.extend_from_slice(b"070701");
    for f in fields {
        head.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    head.extend_from_slice(name.as_bytes());
    head.push(0);
    head.resize(head.len().next_multiple_of(4), 0);
    let padded = data.len().next_multiple_of(4);
    put(&head)?;
    put(data)?;
    put(&ZEROS[..padded - data.len()])?;
    Ok(head.len() + padded)
}

const HEADER_LEN: usize = 110;

/// A length as a newc header field (8 hex digits). The members are guest-init (about a megabyte,
/// embedded at build time) and fixed names, far below 4 GiB; a larger one would saturate.
fn field(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
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
    fn size_and_pieces_match_the_archive() {
        let init = b"\x7fELF another odd-length init".to_vec();
        let archive = build(&init);
        assert_eq!(size(&init), archive.len());
        let mut pieces = Vec::new();
        emit(&init, |p| {
            pieces.extend_from_slice(p);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(pieces, archive);
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
