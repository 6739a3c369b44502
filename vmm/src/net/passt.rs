//! One passt process per VM, connected to vmm over a socket pair (`passt --fd`).
//!
//! The guest's network is fixed, as with QEMU's user networking: the guest is 10.0.2.15/24 with MAC
//! 52:54:00:12:34:56, the gateway 10.0.2.2, the DNS forwarder 10.0.2.3 (passt relays queries sent there
//! to the host's resolver). IPv4 only for now (`-4`). passt is told:
//!
//! - `--foreground --one-off`: it stays vmm's child and exits when vmm closes its end of the socket;
//!   `PR_SET_PDEATHSIG` (through `host_tool::command`) kills it if vmm dies first.
//! - `--no-map-gw`: the gateway address is not the host's loopback (the policy drops it anyway).
//! - `-t none -u none`: nothing is forwarded into the guest, so there are no inbound connections.
//! - `--no-dhcp`: the guest is configured by vmm, and its DHCP broadcasts would be dropped anyway.
//! - `--quiet`, output to /dev/null: nothing of passt reaches the command's stdout or stderr. (What
//!   passt says when it fails is lost for now; vmm reports that the connection ended.)

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use super::policy::NetAddresses;

pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const GUEST_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const PREFIX_LEN: u8 = 24;
pub const GATEWAY_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const DNS_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// Why passt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("--net needs passt, which is not installed (apt-get install passt)")]
    NotInstalled,
    #[error("cannot create the socket pair for passt: {0}")]
    Socket(#[source] std::io::Error),
    #[error("cannot start passt: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The addresses the guest's network is configured with.
pub fn addresses() -> NetAddresses {
    NetAddresses {
        guest_mac: GUEST_MAC,
        guest_ipv4: GUEST_IPV4,
        gateway_ipv4: GATEWAY_IPV4,
        dns_ipv4: Some(DNS_IPV4),
        guest_ipv6: None,
        gateway_ipv6: None,
        dns_ipv6: None,
    }
}

/// Where passt is, if it is in PATH.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join("passt"))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// passt's arguments, with its end of the socket pair at `fd`.
pub fn args(fd: RawFd) -> Vec<OsString> {
    let prefix = PREFIX_LEN.to_string();
    [
        "--foreground",
        "--one-off",
        "--quiet",
        "--fd",
        &fd.to_string(),
        "--ipv4-only",
        "--address",
        &GUEST_IPV4.to_string(),
        "--netmask",
        &prefix,
        "--gateway",
        &GATEWAY_IPV4.to_string(),
        "--dns-forward",
        &DNS_IPV4.to_string(),
        "--no-map-gw",
        "--no-dhcp",
        "--tcp-ports",
        "none",
        "--udp-ports",
        "none",
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

/// A running passt. It is not killed when this is dropped: it exits when vmm's end of the socket
/// closes (`--one-off`), or with vmm.
#[derive(Debug)]
pub struct Passt {
    pub child: Child,
}

/// Starts passt at `program` and returns it with vmm's end of the socket.
pub fn start(program: &Path) -> Result<(Passt, UnixStream), PasstError> {
    let (ours, theirs) = UnixStream::pair().map_err(PasstError::Socket)?;
    let fd = theirs.as_raw_fd();
    let mut command = vmm_rootfs::host_tool::command(program);
    command
        .args(args(fd))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe calls are
    // allowed: fcntl is a plain system call on a descriptor the child inherited, touching no memory.
    unsafe {
        command.pre_exec(move || {
            // Our sockets are close-on-exec; passt's end must survive the exec.
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PasstError::NotInstalled,
        _ => PasstError::Spawn(e),
    })?;
    // passt has its copy; ours closes here.
    drop(theirs);
    Ok((Passt { child }, ours))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data is small
mod tests {
    use super::*;

    #[test]
    fn passt_is_told_the_fixed_network_and_no_forwarding() {
        let args: Vec<String> = args(7)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for expected in [
            "--fd 7",
            "--address 10.0.2.15",
            "--netmask 24",
            "--gateway 10.0.2.2",
            "--dns-forward 10.0.2.3",
            "--tcp-ports none",
            "--udp-ports none",
            "--one-off",
            "--foreground",
            "--no-map-gw",
        ] {
            assert!(joined.contains(expected), "{expected} in {joined}");
        }
        let a = addresses();
        assert_eq!(a.guest_ipv4, GUEST_IPV4);
        assert_eq!(a.dns_ipv4, Some(DNS_IPV4));
    }

    /// With passt installed: it answers an ARP request for the gateway, and exits when our end closes.
    #[test]
    fn passt_answers_and_exits_with_the_socket() {
        let Some(program) = find() else {
            eprintln!("passt is not installed: skipped");
            return;
        };
        let (mut passt, ours) = start(&program).unwrap();
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&GUEST_MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&GUEST_MAC);
        arp.extend_from_slice(&GUEST_IPV4.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&GATEWAY_IPV4.octets());
        let mut framed = (arp.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&arp);
        use std::io::{Read, Write};
        (&ours).write_all(&framed).unwrap();
        ours.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut len = [0u8; 4];
        (&ours).read_exact(&mut len).unwrap();
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        (&ours).read_exact(&mut reply).unwrap();
        // an ARP reply to us, for the gateway
        assert_eq!(&reply[..6], &GUEST_MAC);
        assert_eq!(&reply[12..14], &[0x08, 0x06]);
        assert_eq!(&reply[20..22], &[0, 2]);
        drop(ours);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while passt.child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "passt outlived its socket"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
