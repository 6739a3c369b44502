//! `vmm`: run one command in its own microVM and exit with its status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use vmm::config::{cache_dir, is_pvm_host, RawArgs, VmConfig};
use vmm::exit_code::EXIT_VMM_FAILED;
use vmm::output_file::OutputFile;
use vmm::runner;
use vmm::seccomp::Mode;
use vmm::timeline::Timeline;
use vmm_rootfs::{Image, ImageError, ImageStore};

/// Run a command in a fresh microVM and exit with its status.
///
/// Exit status: the command's own; 128+N if it was killed by signal N; 124 if --timeout fired; 125 if
/// vmm itself failed; 126 if the command could not be run; 127 if it was not found.
#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    override_usage = "vmm [OPTIONS] [--cmd SCRIPT | -- PROGRAM [ARGS...]]\n       vmm image import|ls|rm",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Where imported container images are cached [default: ~/.cache/vmm/images]
    #[arg(long, value_name = "DIR", global = true)]
    cache_dir: Option<PathBuf>,
    /// Run in a container image: an OCI image layout directory, a `docker save` tarball, or a root
    /// file system tarball or directory (imported and cached on first use); its Env, WorkingDir, User,
    /// Entrypoint and Cmd apply as with `docker run`, flags override
    #[arg(long, value_name = "SRC", conflicts_with = "rootfs")]
    image: Option<PathBuf>,
    /// Guest kernel: an ELF vmlinux (PVH entry, fastest) or a bzImage [default: ~/.cache/vmm/guest-vmlinux]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Root file system image (ext4), opened read-only [default: ~/.cache/vmm/rootfs/busybox.ext4]
    #[arg(long, value_name = "PATH")]
    rootfs: Option<PathBuf>,
    /// Guest memory in MiB (backed lazily: untouched memory costs nothing)
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    mem: u64,
    /// Number of vCPUs
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u64,
    /// Show the guest's serial console (kernel log) on stderr
    #[arg(long)]
    console: bool,
    /// Extra kernel command line
    #[arg(long, value_name = "ARGS")]
    append: Option<String>,
    /// Shell script to run with /bin/sh -c
    #[arg(long, value_name = "SCRIPT")]
    cmd: Option<String>,
    /// Environment variable for the command (repeatable)
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory of the command [default: /]
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// Run the command as UID[:GID] [default: 0:0]
    #[arg(long, short = 'u', value_name = "UID[:GID]")]
    user: Option<String>,
    /// Hard wall-clock limit in seconds: the VM is torn down and vmm exits 124
    #[arg(long, value_name = "SECS")]
    timeout: Option<String>,
    /// Write a JSON result (status, why the VM ended, timings, byte counts, exits) to FILE
    #[arg(long, value_name = "FILE")]
    result: Option<PathBuf>,
    /// Give the VM a scratch disk of SIZE (e.g. 20G; sparse, deleted when the VM ends) for its writable
    /// layer and /tmp, instead of a tmpfs in guest memory
    #[arg(long, value_name = "SIZE")]
    scratch: Option<String>,
    /// Copy the contents of HOST_DIR into GUEST_DIR (created if missing, owned by the command's user)
    /// before the command starts (repeatable)
    #[arg(long = "copy-in", value_name = "HOST_DIR:GUEST_DIR")]
    copy_in: Vec<String>,
    /// Copy GUEST_PATH (a file or directory) into HOST_DIR (created if missing) after the command ends
    /// (repeatable); if one fails and the command succeeded, vmm exits 125
    #[arg(long = "copy-out", value_name = "GUEST_PATH:HOST_DIR")]
    copy_out: Vec<String>,
    /// Write a timeline of the run (host phases, guest milestones, exits) as Chrome trace-event JSON
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Go ahead on a host whose /dev/kvm cannot run a standard kernel at a useful speed (PVM)
    #[arg(long)]
    allow_slow_host: bool,
    /// Give the guest a network through passt: outbound TCP and UDP to public addresses, and DNS
    #[arg(long)]
    net: bool,
    /// Allow only DEST (host name, address or CIDR, with an optional :PORT; [IPV6]:PORT); repeatable,
    /// implies --net. The only way to reach a private or link-local address is to name it
    #[arg(long = "net-allow", value_name = "DEST")]
    net_allow: Vec<String>,
    /// What vmm's seccomp filters do with a system call a thread has no business making: `trap` stops
    /// it and vmm (exit 125, one line), `kill` has the kernel kill vmm, `log` lets it run and logs it
    #[arg(long, value_name = "MODE", value_enum, default_value_t = Mode::Trap)]
    seccomp: Mode,
    /// Program and arguments to run without a shell
    #[arg(last = true, value_name = "PROGRAM")]
    argv: Vec<String>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Manage the cache of container images converted to bootable root file systems
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, clap::Subcommand)]
enum ImageCommand {
    /// Import an OCI image layout, a `docker save` tarball, or a rootfs tarball or directory
    Import { src: PathBuf },
    /// List cached images
    Ls,
    /// Remove a cached image, by digest (prefix) or source path
    Rm { reference: String },
}

/// glibc gives each new thread that allocates its own malloc arena: a 64 MiB reservation trimmed with
/// munmap, about 0.4 ms on the vCPU thread's way to its first KVM_RUN on a PVM host, and more resident
/// memory. vmm's few threads allocate little and rarely at the same time: one arena serves them all.
fn one_malloc_arena() {
    // SAFETY: mallopt only sets a malloc tunable; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    one_malloc_arena();
    die_with_parent();
    // Before any thread exists, so that every thread inherits the blocked mask.
    let signals = match vmm::lifecycle::block_lifecycle_signals() {
        Ok(fd) => fd,
        Err(e) => return fail(&format!("cannot set up signal handling: {e}")),
    };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_VMM_FAILED } else { 0 };
            let _ = e.print();
            return exit_code(code);
        }
    };
    if let Some(Command::Image(cmd)) = &cli.command {
        return image_command(cmd, || ImageStore::open(&store_dir(&cli)));
    }
    if let Err(e) = vmm::seccomp::configure(cli.seccomp) {
        return fail(&e.to_string());
    }
    // --timeout bounds the whole run, the image import and the user lookup included: the event loop's
    // timer gets what is left of it, and the watchdog ends vmm if some step does not give way.
    let timeout = match cli.timeout.as_deref().map(vmm::config::parse_timeout) {
        Some(Err(e)) => return fail(&e.to_string()),
        Some(Ok(t)) => Some(t),
        None => None,
    };
    if let Some(t) = timeout {
        if let Err(e) = vmm::watchdog::start(start + t) {
            return fail(&format!("cannot start the --timeout watchdog thread: {e}"));
        }
    }
    let config = match config_of(cli, timeout) {
        Ok(config) => config,
        Err(message) => return fail(&message),
    };
    run_vm(&config, signals, start)
}

/// The run's validated configuration: the image imported (or found in the cache), `--user` or the
/// image's User resolved in the root image, every flag checked, and the host able to run it.
fn config_of(cli: Cli, timeout: Option<Duration>) -> Result<VmConfig, String> {
    let store = store_dir(&cli);
    let (mut rootfs, mut image, mut user_ids) = (cli.rootfs, None, None);
    if let Some(src) = &cli.image {
        let imported = ImageStore::open(&store)
            .and_then(|s| import_with_progress(&s, src))
            .map_err(|e| e.to_string())?;
        rootfs = Some(imported.rootfs);
        image = Some(imported.config);
    }
    // --user, else the image's User, by name or number, resolved against the root image's own /etc
    // files as `docker run` does inside the container
    let user = cli.user.clone().or_else(|| {
        image
            .as_ref()
            .and_then(|i: &vmm_rootfs::ImageConfig| i.user.clone())
    });
    if let Some(user) = user.filter(|u| !u.is_empty()) {
        let root = rootfs.clone().unwrap_or_else(vmm::config::default_rootfs);
        let ids =
            vmm_rootfs::resolve_user(&root, &user).map_err(|e| format!("--user {user}: {e}"))?;
        user_ids = Some(ids);
    }
    let raw = RawArgs {
        kernel: cli.kernel,
        rootfs,
        mem_mib: cli.mem,
        vcpus: cli.vcpus,
        console: cli.console,
        append: cli.append,
        cmd: cli.cmd,
        argv: cli.argv,
        env: cli.env,
        workdir: cli.workdir,
        user: None,
        timeout,
        result: cli.result,
        trace: cli.trace,
        scratch: cli.scratch,
        copy_in: cli.copy_in,
        copy_out: cli.copy_out,
        allow_slow_host: cli.allow_slow_host,
        net: cli.net,
        net_allow: cli.net_allow,
        image,
        user_ids,
    };
    let config = VmConfig::try_from(raw).map_err(|e| e.to_string())?;
    // With --allow-slow-host the answer would change nothing: do not ask.
    if !config.allow_slow_host && is_pvm_host() {
        return Err(
            "this host's /dev/kvm is PVM (kvm_pvm, no VT-x/AMD-V): a standard guest kernel would be \
             interpreted instruction by instruction and take minutes to boot; run vmm on a host with \
             hardware virtualization or inside the emulated test host (tests/testhost/run vmm ...), \
             or pass --allow-slow-host to go ahead anyway"
                .into(),
        );
    }
    Ok(config)
}

/// Runs the VM of `config` and writes its result: vmm's exit status.
fn run_vm(config: &VmConfig, signals: std::os::fd::OwnedFd, start: Instant) -> ExitCode {
    let mut timeline = Timeline::new(start);
    timeline.mark("arguments parsed");

    // Opened now, before the main thread's seccomp filter, which then allows publishing them and
    // writing no other file.
    let open_output = |path: &Option<std::path::PathBuf>, what: &str| {
        path.as_deref()
            .map(|p| {
                OutputFile::create(p)
                    .map_err(|e| format!("cannot write {what} to {}: {e}", p.display()))
            })
            .transpose()
    };
    let (result_out, trace_out) = match (
        open_output(&config.result_file, "the result"),
        open_output(&config.trace_file, "the trace"),
    ) {
        (Ok(r), Ok(t)) => (r, t),
        (Err(e), _) | (_, Err(e)) => return fail(&e),
    };
    let dirs: Vec<_> = [&result_out, &trace_out]
        .into_iter()
        .flatten()
        .map(OutputFile::dir_fd)
        .collect();
    vmm::seccomp::allow_output_dirs(&dirs);

    let result = match runner::run(config, signals, timeline, trace_out) {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    if let Some(error) = &result.error {
        eprintln!("vmm: {error}");
    }
    if let (Some(out), Some(path)) = (result_out, &config.result_file) {
        let written = serde_json::to_vec_pretty(&result)
            .map_err(std::io::Error::other)
            .and_then(|json| out.publish(&json));
        if let Err(e) = written {
            eprintln!("vmm: cannot write the result to {}: {e}", path.display());
            return exit_code(EXIT_VMM_FAILED);
        }
    }
    exit_code(result.exit_code)
}

/// Imports `src`, printing progress to stderr only when the import takes more than a moment.
fn import_with_progress(store: &ImageStore, src: &std::path::Path) -> Result<Image, ImageError> {
    let start = Instant::now();
    let mut progress = |line: &str| {
        if start.elapsed() > Duration::from_millis(300) {
            eprintln!("vmm: {line}");
        }
    };
    store.import(src, &mut progress)
}

fn image_command(
    cmd: &ImageCommand,
    store: impl Fn() -> Result<ImageStore, ImageError>,
) -> ExitCode {
    let store = match store() {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string()),
    };
    let result = match cmd {
        ImageCommand::Import { src } => import_with_progress(&store, src).map(|image| {
            println!("{} {}", image.digest, image.rootfs.display());
        }),
        ImageCommand::Ls => store.list().map(|images| {
            for i in images {
                println!("{}  {:>6} MiB  {}", &i.digest, i.size_bytes >> 20, i.source);
            }
        }),
        ImageCommand::Rm { reference } => store
            .remove(reference)
            .map(|i| println!("removed {}", i.digest)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

/// The VM never outlives the process that started vmm: if our parent dies, so do we, and the VM with us.
fn die_with_parent() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // The parent may have died between the two calls: then we were re-parented already.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        eprintln!("vmm: the process that started vmm has exited");
        std::process::exit(EXIT_VMM_FAILED);
    }
}

/// The image cache: `--cache-dir`, or `images` in vmm's cache directory.
fn store_dir(cli: &Cli) -> PathBuf {
    cli.cache_dir
        .clone()
        .unwrap_or_else(|| cache_dir().join("images"))
}

fn fail(message: &str) -> ExitCode {
    eprintln!("vmm: {message}");
    exit_code(EXIT_VMM_FAILED)
}

/// An exit status as the byte a parent sees, clamped to 0..=255 (vmm's own codes are all in range).
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(u8::MAX))
}
