//! Everything the user asked for, parsed and checked up front: a bad flag, a missing file, an
//! unreadable image or a kernel that is neither an ELF vmlinux nor a bzImage is an error here, before any
//! KVM call. Nothing downstream re-parses user input.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::arch::mptable::MAX_VCPUS;

/// Smallest guest: the kernel loads at 16 MiB and needs room above it.
pub const MIN_MEM_MIB: u64 = 64;
/// Largest guest we accept (guest memory is lazily backed, but the address space is not free).
pub const MAX_MEM_MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("kernel {0}: {1} (build one with kernel-config/build.sh guest, or pass --kernel)")]
    KernelUnreadable(PathBuf, std::io::Error),
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat(PathBuf),
    #[error("root file system image {0}: {1} (build one with rootfs/busybox-image.sh, or pass --rootfs)")]
    RootfsUnreadable(PathBuf, std::io::Error),
    #[error("root file system image {0} is empty or its size is not a multiple of 512 bytes: not a disk image")]
    RootfsSize(PathBuf),
    #[error("--mem {0}: must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB")]
    Memory(u64),
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u64),
    #[error("--env {0:?}: expected KEY=VALUE")]
    Env(String),
    #[error("--user {0:?}: expected UID or UID:GID (numbers)")]
    User(String),
    #[error("--workdir {0:?}: must be an absolute path")]
    Workdir(String),
    #[error("--timeout {0:?}: expected a positive number of seconds")]
    Timeout(String),
    #[error("--append {0:?}: {1}")]
    Append(String, &'static str),
    #[error("--scratch {0:?}: expected a size such as 512M or 20G (at least 16M)")]
    Scratch(String),
    #[error("the image has no Entrypoint or Cmd: give the command with --cmd or after --")]
    ImageHasNoCommand,
    #[error("give the command either with --cmd or after --, not both")]
    CommandTwice,
    #[error("--{0} {1:?}: {2}")]
    Copy(&'static str, String, String),
    #[error("--copy-in and --copy-out need a command (--cmd, after --, or the image's)")]
    CopyWithoutCommand,
    #[error(transparent)]
    NetAllow(#[from] crate::net::AllowError),
    #[error(transparent)]
    Passt(#[from] crate::net::passt::PasstError),
}

/// `--net`: the guest gets a network device, its frames go through passt and the egress policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Empty: the default policy (public addresses and DNS). Otherwise only what these name.
    pub allow: Vec<crate::net::AllowEntry>,
    /// passt, found in PATH.
    pub passt: PathBuf,
}

/// What to copy in before the command and out after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transfers {
    /// (host directory, guest directory): the host directory's contents land in the guest directory.
    pub copy_in: Vec<(PathBuf, String)>,
    /// (guest path, host directory): the guest file or directory lands in the host directory, under
    /// its own name.
    pub copy_out: Vec<(String, PathBuf)>,
}

/// How the kernel image is laid out, which decides how it is loaded and entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF vmlinux (PVH entry when it has the note: the fast path).
    Elf,
    /// A compressed bzImage (64-bit Linux boot protocol; the decompressor runs in the guest).
    BzImage,
}

/// The command to run in the guest and its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    /// The command's whole environment: PATH and HOME by default, then the image's Env, then `--env`
    /// (a later KEY replaces an earlier one).
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    pub transfers: Transfers,
}

/// A validated description of one VM and the command it runs.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub kernel_format: KernelFormat,
    pub rootfs: PathBuf,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub console: bool,
    /// Extra kernel command line, appended after ours.
    pub append: String,
    /// None: boot the image's own init (no guest-init, no control channel).
    pub command: Option<CommandSpec>,
    pub timeout: Option<Duration>,
    pub result_file: Option<PathBuf>,
    pub trace_file: Option<PathBuf>,
    /// Size of a scratch disk for the writable layer and /tmp (instead of a tmpfs in guest memory).
    pub scratch_bytes: Option<u64>,
    /// Run even where /dev/kvm cannot run a standard kernel at a useful speed.
    pub allow_slow_host: bool,
    /// None: no network device (only `lo` in the guest).
    pub net: Option<NetConfig>,
}

/// The raw flags, as the command line parser produced them.
#[derive(Debug, Clone, Default)]
pub struct RawArgs {
    pub kernel: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub mem_mib: u64,
    pub vcpus: u64,
    pub console: bool,
    pub append: Option<String>,
    pub cmd: Option<String>,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// `--timeout`, parsed once by [`parse_timeout`] where vmm starts (its watchdog needs it before
    /// anything else).
    pub timeout: Option<Duration>,
    pub result: Option<PathBuf>,
    pub trace: Option<PathBuf>,
    pub scratch: Option<String>,
    /// `HOST_DIR:GUEST_DIR`, repeatable.
    pub copy_in: Vec<String>,
    /// `GUEST_PATH:HOST_DIR`, repeatable.
    pub copy_out: Vec<String>,
    pub allow_slow_host: bool,
    /// `--net`.
    pub net: bool,
    /// `--net-allow DEST`, repeatable; implies `--net`.
    pub net_allow: Vec<String>,
    /// The config of the container image the rootfs came from (`--image`): its Env, WorkingDir,
    /// Entrypoint and Cmd apply as `docker run` applies them, flags override.
    pub image: Option<vmm_rootfs::ImageConfig>,
    /// --user or the image's User, already resolved to numbers against the root image's /etc files.
    pub user_ids: Option<(u32, u32)>,
}

/// Where the project's build scripts leave their artifacts.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMM_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("vmm")
}

pub fn default_kernel() -> PathBuf {
    cache_dir().join("guest-vmlinux")
}

pub fn default_rootfs() -> PathBuf {
    cache_dir().join("rootfs").join("busybox.ext4")
}

impl TryFrom<RawArgs> for VmConfig {
    type Error = ConfigError;

    fn try_from(raw: RawArgs) -> Result<Self, ConfigError> {
        let kernel = raw.kernel.clone().unwrap_or_else(default_kernel);
        let kernel_format = detect_kernel_format(&kernel)?;
        let rootfs = raw.rootfs.clone().unwrap_or_else(default_rootfs);
        check_rootfs(&rootfs)?;
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&raw.mem_mib) {
            return Err(ConfigError::Memory(raw.mem_mib));
        }
        let vcpus = u8::try_from(raw.vcpus)
            .ok()
            .filter(|&n| n != 0 && n <= MAX_VCPUS)
            .ok_or(ConfigError::Vcpus(raw.vcpus))?;
        let append = raw.append.clone().unwrap_or_default();
        if append.contains('\0') || append.contains('\n') {
            return Err(ConfigError::Append(
                append,
                "must be one line without NUL bytes",
            ));
        }

        let command = command_spec(&raw)?;
        let scratch_bytes = raw.scratch.clone().map(|s| parse_size(&s)).transpose()?;
        let net = net_config(&raw)?;

        Ok(VmConfig {
            kernel,
            kernel_format,
            rootfs,
            mem_mib: raw.mem_mib,
            vcpus,
            console: raw.console,
            append,
            command,
            timeout: raw.timeout,
            result_file: raw.result,
            trace_file: raw.trace,
            scratch_bytes,
            allow_slow_host: raw.allow_slow_host,
            net,
        })
    }
}

/// `--net` and `--net-allow`: every entry parsed, and passt found, before anything starts.
fn net_config(raw: &RawArgs) -> Result<Option<NetConfig>, ConfigError> {
    if !raw.net && raw.net_allow.is_empty() {
        return Ok(None);
    }
    let allow = raw
        .net_allow
        .iter()
        .map(|d| crate::net::AllowEntry::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    let passt = crate::net::passt::find().ok_or(crate::net::passt::PasstError::NotInstalled)?;
    Ok(Some(NetConfig { allow, passt }))
}

/// The command to run, if any: `--cmd`, or argv after `--` (following the image's Entrypoint), or the
/// image's Entrypoint + Cmd; with its environment, working directory, user and copies.
fn command_spec(raw: &RawArgs) -> Result<Option<CommandSpec>, ConfigError> {
    let image = raw.image.clone().unwrap_or_default();
    let argv = match (raw.cmd.clone(), raw.argv.is_empty()) {
        (Some(_), false) => return Err(ConfigError::CommandTwice),
        (Some(script), true) => Some(vec!["/bin/sh".to_string(), "-c".to_string(), script]),
        // as `docker run IMAGE ARGS...`: the arguments replace Cmd and follow the Entrypoint
        (None, false) => Some(image.entrypoint.iter().chain(&raw.argv).cloned().collect()),
        (None, true) if raw.image.is_some() => {
            let argv: Vec<String> = image.entrypoint.iter().chain(&image.cmd).cloned().collect();
            if argv.is_empty() {
                return Err(ConfigError::ImageHasNoCommand);
            }
            Some(argv)
        }
        (None, true) => None,
    };
    let transfers = Transfers {
        copy_in: raw
            .copy_in
            .iter()
            .map(|s| parse_copy_in(s))
            .collect::<Result<_, _>>()?,
        copy_out: raw
            .copy_out
            .iter()
            .map(|s| parse_copy_out(s))
            .collect::<Result<_, _>>()?,
    };
    Ok(match argv {
        None if transfers != Transfers::default() => return Err(ConfigError::CopyWithoutCommand),
        None => None,
        Some(argv) => {
            let flag_env = raw
                .env
                .iter()
                .map(|e| parse_env(e))
                .collect::<Result<Vec<_>, _>>()?;
            let workdir = raw
                .workdir
                .clone()
                .or_else(|| image.working_dir.clone().filter(|w| !w.is_empty()))
                .unwrap_or_else(|| "/".to_string());
            if !workdir.starts_with('/') {
                return Err(ConfigError::Workdir(workdir));
            }
            let (uid, gid) = match &raw.user {
                Some(u) => parse_user(u)?,
                None => raw.user_ids.unwrap_or((0, 0)),
            };
            let image_env = image
                .env
                .iter()
                .filter_map(|e| e.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()));
            let env = merge_env(
                default_env(uid)
                    .into_iter()
                    .chain(image_env)
                    .chain(flag_env),
            );
            Some(CommandSpec {
                argv,
                env,
                workdir,
                uid,
                gid,
                transfers,
            })
        }
    })
}

/// Reads the first bytes of the kernel: ELF magic, or the bzImage "HdrS" signature at 0x202.
pub fn detect_kernel_format(path: &Path) -> Result<KernelFormat, ConfigError> {
    let mut head = [0u8; 0x206];
    let mut file =
        File::open(path).map_err(|e| ConfigError::KernelUnreadable(path.to_path_buf(), e))?;
    let n = read_up_to(&mut file, &mut head)
        .map_err(|e| ConfigError::KernelUnreadable(path.to_path_buf(), e))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(ConfigError::KernelFormat(path.to_path_buf()))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn check_rootfs(path: &Path) -> Result<(), ConfigError> {
    let file =
        File::open(path).map_err(|e| ConfigError::RootfsUnreadable(path.to_path_buf(), e))?;
    let meta = file
        .metadata()
        .map_err(|e| ConfigError::RootfsUnreadable(path.to_path_buf(), e))?;
    if meta.is_dir() {
        return Err(ConfigError::RootfsUnreadable(
            path.to_path_buf(),
            std::io::Error::other("is a directory; make an image with rootfs/mkimage.sh"),
        ));
    }
    if meta.len() == 0 || meta.len() % 512 != 0 {
        return Err(ConfigError::RootfsSize(path.to_path_buf()));
    }
    Ok(())
}

fn parse_env(entry: &str) -> Result<(String, String), ConfigError> {
    match entry.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(ConfigError::Env(entry.to_string())),
    }
}

/// `HOST_DIR:GUEST_DIR` (split at the last colon: guest paths are ours to keep simple, host paths
/// are not): an existing host directory and an absolute guest path.
fn parse_copy_in(spec: &str) -> Result<(PathBuf, String), ConfigError> {
    let bad = |why: &str| ConfigError::Copy("copy-in", spec.to_string(), why.to_string());
    let (host, guest) = spec
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST_DIR:GUEST_DIR"))?;
    check_guest_path(guest).map_err(|why| bad(&why))?;
    match std::fs::metadata(host) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad(&format!("{host} is not a directory"))),
        Err(e) => return Err(bad(&format!("{host}: {e}"))),
    }
    Ok((PathBuf::from(host), guest.to_string()))
}

/// `GUEST_PATH:HOST_DIR` (split at the first colon): a guest path with a name of its own, and a host
/// directory that is one or can be made one.
fn parse_copy_out(spec: &str) -> Result<(String, PathBuf), ConfigError> {
    let bad = |why: &str| ConfigError::Copy("copy-out", spec.to_string(), why.to_string());
    let (guest, host) = spec
        .split_once(':')
        .ok_or_else(|| bad("expected GUEST_PATH:HOST_DIR"))?;
    check_guest_path(guest).map_err(|why| bad(&why))?;
    if Path::new(guest).file_name().is_none() {
        return Err(bad("GUEST_PATH must name a file or directory below /"));
    }
    if host.is_empty() || host.contains('\0') {
        return Err(bad("expected GUEST_PATH:HOST_DIR"));
    }
    match std::fs::metadata(host) {
        Ok(m) if !m.is_dir() => return Err(bad(&format!("{host} is not a directory"))),
        _ => {}
    }
    Ok((guest.to_string(), PathBuf::from(host)))
}

fn check_guest_path(guest: &str) -> Result<(), String> {
    if !guest.starts_with('/') {
        return Err(format!("the guest path {guest:?} must be absolute"));
    }
    if guest.contains('\0') {
        return Err("the guest path has a NUL byte".into());
    }
    Ok(())
}

fn parse_user(user: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || ConfigError::User(user.to_string());
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid: u32 = u.parse().map_err(|_| bad())?;
    let gid: u32 = match g {
        Some(g) => g.parse().map_err(|_| bad())?,
        None => uid,
    };
    Ok((uid, gid))
}

/// "512M", "20G", "1T", "1048576" (bytes) -> bytes.
fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::Scratch(s.to_string());
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(1 << shift).ok_or_else(bad)?;
    if !(16 << 20..=1 << 50).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes)
}

/// What every command's environment starts from, as `docker run` gives it.
fn default_env(uid: u32) -> [(String, String); 2] {
    let home = if uid == 0 { "/root" } else { "/" };
    [
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), home.into()),
    ]
}

/// `KEY=VALUE` pairs in order, a later KEY replacing an earlier one in its place.
fn merge_env(pairs: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for (k, v) in pairs {
        match env.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => env.push((k, v)),
        }
    }
    env
}

/// `--timeout`: seconds, fractions allowed.
pub fn parse_timeout(t: &str) -> Result<Duration, ConfigError> {
    let secs: f64 = t.parse().map_err(|_| ConfigError::Timeout(t.to_string()))?;
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(ConfigError::Timeout(t.to_string()));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What the host's /dev/kvm can do for a standard Linux guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavour {
    /// VT-x or AMD-V: guests run at native speed.
    Hardware,
    /// PVM (kvm_pvm, no vmx/svm): a non-PVM guest kernel's ring 0 is interpreted, about a minute to boot.
    Pvm,
    /// Neither recognisable: let KVM decide.
    Unknown,
}

/// Whether /dev/kvm is PVM, from the loaded modules and /proc/cpuinfo. /proc/cpuinfo is read only where
/// kvm_pvm is loaded: producing it costs a tenth of a millisecond on two CPUs (the kernel asks every CPU
/// for its frequency) and grows with the CPU count, on every run.
pub fn is_pvm_host() -> bool {
    pvm_loaded()
        && classify_kvm(
            &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            true,
        ) == KvmFlavour::Pvm
}

fn pvm_loaded() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
        || std::fs::read_to_string("/proc/modules")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("kvm_pvm "))
}

fn classify_kvm(cpuinfo: &str, pvm_loaded: bool) -> KvmFlavour {
    let has_hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    match (has_hw, pvm_loaded) {
        (true, _) => KvmFlavour::Hardware,
        (false, true) => KvmFlavour::Pvm,
        (false, false) => KvmFlavour::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file of its own for every call: the tests run in parallel.
    fn temp_file(name: &str, content: &[u8]) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmm-config-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(content).unwrap();
        p
    }

    fn elf() -> PathBuf {
        temp_file("vmlinux", b"\x7fELF\x02\x01\x01rest-of-it")
    }

    fn disk() -> PathBuf {
        temp_file("disk.img", &[0u8; 1024])
    }

    fn raw() -> RawArgs {
        RawArgs {
            kernel: Some(elf()),
            rootfs: Some(disk()),
            mem_mib: 256,
            vcpus: 1,
            ..Default::default()
        }
    }

    #[test]
    fn kernel_formats_are_recognised() {
        assert_eq!(detect_kernel_format(&elf()).unwrap(), KernelFormat::Elf);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            detect_kernel_format(&temp_file("bzImage", &bz)).unwrap(),
            KernelFormat::BzImage
        );
        assert!(matches!(
            detect_kernel_format(&temp_file("junk", b"#!/bin/sh\n")),
            Err(ConfigError::KernelFormat(_))
        ));
        assert!(matches!(
            detect_kernel_format(Path::new("/nonexistent/vmlinux")),
            Err(ConfigError::KernelUnreadable(..))
        ));
    }

    #[test]
    fn script_and_argv_commands() {
        let c = VmConfig::try_from(RawArgs {
            cmd: Some("echo hi".into()),
            ..raw()
        })
        .unwrap();
        assert_eq!(c.command.unwrap().argv, ["/bin/sh", "-c", "echo hi"]);
        let c = VmConfig::try_from(RawArgs {
            argv: vec!["ls".into(), "/".into()],
            ..raw()
        })
        .unwrap();
        assert_eq!(c.command.unwrap().argv, ["ls", "/"]);
        assert!(VmConfig::try_from(raw()).unwrap().command.is_none());
        assert!(matches!(
            VmConfig::try_from(RawArgs {
                cmd: Some("x".into()),
                argv: vec!["y".into()],
                ..raw()
            }),
            Err(ConfigError::CommandTwice)
        ));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(matches!(
            VmConfig::try_from(RawArgs {
                mem_mib: 8,
                ..raw()
            }),
            Err(ConfigError::Memory(8))
        ));
        assert!(matches!(
            VmConfig::try_from(RawArgs { vcpus: 0, ..raw() }),
            Err(ConfigError::Vcpus(0))
        ));
        assert!(matches!(
            VmConfig::try_from(RawArgs {
                vcpus: 999,
                ..raw()
            }),
            Err(ConfigError::Vcpus(999))
        ));
        let with_cmd = || RawArgs {
            cmd: Some("true".into()),
            ..raw()
        };
        assert!(matches!(
            VmConfig::try_from(RawArgs {
                env: vec!["NOEQUALS".into()],
                ..with_cmd()
            }),
            Err(ConfigError::Env(_))
        ));
        assert!(matches!(
            VmConfig::try_from(RawArgs {
                user: Some("bob".into()),
                ..with_cmd()
            }),
            Err(ConfigError::User(_))
        ));
        assert!(matches!(
            VmConfig::try_from(RawArgs {
                workdir: Some("rel".into()),
                ..with_cmd()
            }),
            Err(ConfigError::Workdir(_))
        ));
        for t in ["0", "-1", "abc", "inf", "NaN"] {
            assert!(matches!(parse_timeout(t), Err(ConfigError::Timeout(_))));
        }
        assert!(matches!(
            VmConfig::try_from(RawArgs {
                rootfs: Some(temp_file("odd.img", &[0; 100])),
                ..raw()
            }),
            Err(ConfigError::RootfsSize(_))
        ));
        assert!(matches!(
            VmConfig::try_from(RawArgs {
                rootfs: Some("/nonexistent.img".into()),
                ..raw()
            }),
            Err(ConfigError::RootfsUnreadable(..))
        ));
    }

    #[test]
    fn user_env_timeout_parse() {
        let c = VmConfig::try_from(RawArgs {
            cmd: Some("true".into()),
            env: vec!["A=b=c".into(), "EMPTY=".into()],
            user: Some("1000:100".into()),
            timeout: Some(parse_timeout("2.5").unwrap()),
            ..raw()
        })
        .unwrap();
        let cmd = c.command.unwrap();
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            cmd.env,
            [
                pair(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                ),
                pair("HOME", "/"),
                pair("A", "b=c"),
                pair("EMPTY", "")
            ]
        );
        assert_eq!((cmd.uid, cmd.gid), (1000, 100));
        assert_eq!(c.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(parse_user("7").unwrap(), (7, 7));
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("20g").unwrap(), 20 << 30);
        for bad in ["", "1", "12X", "G", "99999999999T", "-1G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_config_applies_as_docker_run_does_and_flags_override() {
        let image = vmm_rootfs::ImageConfig {
            env: vec!["PATH=/opt/bin:/bin".into(), "LANG=C".into(), "junk".into()],
            working_dir: Some("/src".into()),
            user: Some("builder".into()),
            entrypoint: vec!["/entry".into()],
            cmd: vec!["make".into(), "all".into()],
        };
        let with_image = || RawArgs {
            image: Some(image.clone()),
            user_ids: Some((1000, 100)),
            ..raw()
        };
        let c = VmConfig::try_from(with_image()).unwrap().command.unwrap();
        assert_eq!(c.argv, ["/entry", "make", "all"]);
        // the defaults first, the image's Env over them
        assert_eq!(
            c.env,
            [
                ("PATH".into(), "/opt/bin:/bin".into()),
                ("HOME".into(), "/".into()),
                ("LANG".into(), "C".into())
            ]
        );
        assert_eq!((c.workdir.as_str(), c.uid, c.gid), ("/src", 1000, 100));
        let c = VmConfig::try_from(RawArgs {
            argv: vec!["test".into()],
            env: vec!["LANG=en".into()],
            workdir: Some("/w".into()),
            user: Some("0".into()),
            ..with_image()
        })
        .unwrap()
        .command
        .unwrap();
        assert_eq!(c.argv, ["/entry", "test"]);
        // --user 0 gets root's HOME; --env replaces the image's LANG in its place
        assert_eq!(c.env[1], ("HOME".into(), "/root".into()));
        assert_eq!(c.env[2], ("LANG".into(), "en".into()));
        assert_eq!((c.workdir.as_str(), c.uid), ("/w", 0));
        let c = VmConfig::try_from(RawArgs {
            cmd: Some("ls".into()),
            ..with_image()
        })
        .unwrap();
        assert_eq!(c.command.unwrap().argv, ["/bin/sh", "-c", "ls"]);
        let bare = RawArgs {
            image: Some(Default::default()),
            ..raw()
        };
        assert!(matches!(
            VmConfig::try_from(bare),
            Err(ConfigError::ImageHasNoCommand)
        ));
    }

    #[test]
    fn kvm_flavour_classification() {
        let vmx = "processor : 0\nflags : fpu vme vmx sse\n";
        let plain = "processor : 0\nflags : fpu vme sse\n";
        assert_eq!(classify_kvm(vmx, false), KvmFlavour::Hardware);
        assert_eq!(classify_kvm("flags : svm\n", true), KvmFlavour::Hardware);
        assert_eq!(classify_kvm(plain, true), KvmFlavour::Pvm);
        assert_eq!(classify_kvm(plain, false), KvmFlavour::Unknown);
    }

    #[test]
    fn copy_in_and_copy_out_are_parsed_and_checked() {
        let dir = std::env::temp_dir();
        let d = dir.display().to_string();
        let mut r = raw();
        r.cmd = Some("make".into());
        r.copy_in = vec![format!("{d}:/src")];
        r.copy_out = vec![format!("/src/out:{d}/artifacts"), "/log.txt:rel".into()];
        let c = VmConfig::try_from(r).unwrap();
        let t = &c.command.unwrap().transfers;
        assert_eq!(t.copy_in, [(dir.clone(), "/src".to_string())]);
        assert_eq!(
            t.copy_out,
            [
                ("/src/out".to_string(), dir.join("artifacts")),
                ("/log.txt".to_string(), PathBuf::from("rel"))
            ]
        );

        let refused = |copy_in: &[String], copy_out: &[String], cmd: bool| {
            let mut r = raw();
            r.cmd = cmd.then(|| "true".to_string());
            r.copy_in = copy_in.to_vec();
            r.copy_out = copy_out.to_vec();
            VmConfig::try_from(r).unwrap_err().to_string()
        };
        let file = elf().display().to_string();
        let bad_in = [
            ("/no/such/dir:/src".to_string(), "/no/such/dir"),
            (format!("{file}:/src"), "is not a directory"),
            (format!("{d}:src"), "must be absolute"),
            (d.clone(), "expected HOST_DIR:GUEST_DIR"),
        ];
        for (spec, want) in bad_in {
            let e = refused(&[spec], &[], true);
            assert!(e.contains(want), "{e}");
        }
        let bad_out = [
            ("/:out".to_string(), "must name a file or directory"),
            ("out:/x".to_string(), "must be absolute"),
            ("/out:".to_string(), "expected GUEST_PATH:HOST_DIR"),
            (format!("/out:{file}"), "is not a directory"),
        ];
        for (spec, want) in bad_out {
            let e = refused(&[], &[spec], true);
            assert!(e.contains(want), "{e}");
        }
        let e = refused(&[], &["/out:x".to_string()], false);
        assert!(e.contains("need a command"), "{e}");
    }

    #[test]
    fn net_is_off_by_default_and_net_allow_is_checked_up_front() {
        assert_eq!(VmConfig::try_from(raw()).unwrap().net, None);
        let e = VmConfig::try_from(RawArgs {
            net_allow: vec!["example.com".into(), "10.0.0.1/8".into()],
            ..raw()
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::NetAllow(_)), "{e}");
        assert!(
            e.to_string().starts_with("--net-allow \"10.0.0.1/8\""),
            "{e}"
        );
        // with passt installed, --net-allow implies --net; without, one line says what to install
        match VmConfig::try_from(RawArgs {
            net_allow: vec!["example.com:443".into(), "[2a00::1]:80".into()],
            ..raw()
        }) {
            Ok(c) => assert_eq!(c.net.unwrap().allow.len(), 2),
            Err(e) => assert!(e.to_string().contains("apt-get install passt"), "{e}"),
        }
    }
}
