//! The session end to end over a Unix socket pair, with real commands: what the host receives.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use vmm_protocol::{ErrorKind, ExitStatus, Message, Milestone, ReadError, RunRequest, MAX_CHUNK};

use super::*;

fn cfg() -> SessionConfig {
    SessionConfig {
        run_timeout: Duration::from_secs(10),
        reap: ReapMode::OnlyCommand,
        relay: RelayConfig::default(),
    }
}

fn req(argv: &[&str]) -> RunRequest {
    RunRequest {
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: vec![b"PATH=/usr/local/bin:/usr/bin:/bin".to_vec()],
        workdir: b"/".to_vec(),
        // SAFETY: getuid/getgid have no preconditions.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
        copy_in: Vec::new(),
        copy_out: Vec::new(),
    }
}

/// What the host received, with the time each frame arrived.
struct Received {
    result: Result<Outcome, SessionError>,
    frames: Vec<(Instant, Message)>,
}

impl Received {
    fn messages(&self) -> impl Iterator<Item = &Message> {
        self.frames.iter().map(|(_, m)| m)
    }
    fn stdout(&self) -> Vec<u8> {
        self.messages()
            .filter_map(|m| match m {
                Message::Stdout(d) => Some(d.as_slice()),
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    }
    fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout()).into_owned()
    }
    fn stderr_str(&self) -> String {
        let bytes: Vec<u8> = self
            .messages()
            .filter_map(|m| match m {
                Message::Stderr(d) => Some(d.as_slice()),
                _ => None,
            })
            .flatten()
            .copied()
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    fn milestones(&self) -> Vec<(Milestone, u64)> {
        self.messages()
            .filter_map(|m| match m {
                Message::Milestone {
                    milestone,
                    boottime_ns,
                } => Some((*milestone, *boottime_ns)),
                _ => None,
            })
            .collect()
    }
    fn last(&self) -> Option<&Message> {
        self.frames.last().map(|(_, m)| m)
    }
    fn exit(&self) -> ExitStatus {
        match self.last() {
            Some(Message::Exit(s)) => {
                assert!(
                    matches!(self.result, Ok(Outcome::Exited(r)) if r == *s),
                    "{:?}",
                    self.result
                );
                *s
            }
            other => panic!(
                "last frame is not Exit: {other:?}; stderr {:?}",
                self.stderr_str()
            ),
        }
    }
    fn error(&self) -> (ErrorKind, String) {
        match self.last() {
            Some(Message::Error { kind, message }) => {
                assert!(matches!(self.result, Ok(Outcome::NotStarted(k)) if k == *kind));
                (*kind, message.clone())
            }
            other => panic!("last frame is not Error: {other:?}"),
        }
    }
}

/// Runs a session: the host sends `before` and `Run(request)` and then `after`, from a thread of its
/// own, and reads every frame until the guest closes the connection.
fn session_with(
    before: Vec<Message>,
    request: RunRequest,
    after: Vec<Message>,
    cfg: SessionConfig,
) -> Received {
    let (guest, host) = UnixStream::pair().unwrap();
    let mut host_w = host.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for m in before
            .into_iter()
            .chain(std::iter::once(Message::Run(request)))
            .chain(after)
        {
            // the guest may be gone already (e.g. the command did not start)
            if m.write_to(&mut host_w).is_err() {
                break;
            }
        }
        host_w
    });
    let guest_side = thread::spawn(move || {
        let mut chan = Channel::new(guest.into());
        let mut timeline = Timeline::new();
        serve(&mut chan, &mut timeline, &cfg)
        // chan dropped: the host sees end of file
    });
    let mut frames = Vec::new();
    let mut host_r = host;
    loop {
        match Message::read_from(&mut host_r) {
            Ok(m) => frames.push((Instant::now(), m)),
            Err(ReadError::Closed) => break,
            // a Unix socket closed with unread data (stdin the command never took) resets the
            // peer after the queued frames
            Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("host read: {e}"),
        }
    }
    let result = guest_side.join().unwrap();
    drop(writer.join().unwrap());
    Received { result, frames }
}

fn session(request: RunRequest, after: Vec<Message>) -> Received {
    session_with(Vec::new(), request, after, cfg())
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("guest-init-test-{}-{name}", std::process::id()))
}

#[test]
fn stdout_stderr_and_exit_code() {
    let r = session(
        req(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
        vec![Message::StdinClosed],
    );
    assert_eq!(r.exit(), ExitStatus::Code(3));
    assert_eq!(r.stdout_str(), "out\n");
    assert_eq!(r.stderr_str(), "err\n");
    let ms = r.milestones();
    assert_eq!(
        ms.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![Milestone::CommandStarted, Milestone::CommandExited]
    );
    assert!(ms[0].1 > 0 && ms[0].1 <= ms[1].1);
    // CommandStarted comes first, CommandExited right before Exit
    assert!(matches!(
        r.frames.first().map(|f| &f.1),
        Some(Message::Milestone {
            milestone: Milestone::CommandStarted,
            ..
        })
    ));
    let n = r.frames.len();
    assert!(matches!(
        r.frames[n - 2].1,
        Message::Milestone {
            milestone: Milestone::CommandExited,
            ..
        }
    ));
}

#[test]
fn stdin_is_forwarded_and_closed() {
    let r = session(
        req(&["wc", "-l"]),
        vec![
            Message::Stdin(b"a\nb\n".to_vec()),
            Message::Stdin(Vec::new()),
            Message::Stdin(b"c\n".to_vec()),
            Message::StdinClosed,
            // after StdinClosed: dropped
            Message::Stdin(b"d\n".to_vec()),
        ],
    );
    assert_eq!(r.exit(), ExitStatus::Code(0));
    assert_eq!(r.stdout_str().trim(), "3");
}

#[test]
fn messages_before_the_run_request_are_kept() {
    let r = session_with(
        vec![Message::Stdin(b"x\ny\n".to_vec()), Message::StdinClosed],
        req(&["wc", "-l"]),
        Vec::new(),
        cfg(),
    );
    assert_eq!(r.exit(), ExitStatus::Code(0));
    assert_eq!(r.stdout_str().trim(), "2");
}

#[test]
fn large_stdin_round_trips_through_cat_in_bounded_chunks() {
    // several times the stdin buffer limit, so that backpressure has to work
    let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let stdin = data
        .chunks(MAX_CHUNK)
        .map(|c| Message::Stdin(c.to_vec()))
        .chain(std::iter::once(Message::StdinClosed))
        .collect();
    let r = session(req(&["cat"]), stdin);
    assert_eq!(r.exit(), ExitStatus::Code(0));
    assert!(r.stdout() == data, "stdout differs from stdin");
    for m in r.messages() {
        if let Message::Stdout(d) = m {
            assert!(!d.is_empty() && d.len() <= MAX_CHUNK);
        }
    }
}

#[test]
fn a_command_that_stops_reading_stdin_does_not_hang_the_relay() {
    let stdin = (0..64)
        .map(|_| Message::Stdin(vec![b'z'; MAX_CHUNK]))
        .chain(std::iter::once(Message::StdinClosed))
        .collect();
    let r = session(req(&["head", "-c", "10"]), stdin);
    assert_eq!(r.exit(), ExitStatus::Code(0));
    assert_eq!(r.stdout(), vec![b'z'; 10]);
}

#[test]
fn output_is_streamed_as_it_is_written() {
    let r = session(
        req(&["sh", "-c", "echo first; sleep 1; echo second"]),
        vec![Message::StdinClosed],
    );
    assert_eq!(r.exit(), ExitStatus::Code(0));
    assert_eq!(r.stdout_str(), "first\nsecond\n");
    let first = r
        .frames
        .iter()
        .find(|(_, m)| matches!(m, Message::Stdout(d) if d.starts_with(b"first")))
        .map(|(t, _)| *t)
        .unwrap();
    let end = r.frames.last().unwrap().0;
    assert!(
        end - first >= Duration::from_millis(700),
        "first line arrived only {:?} before the end",
        end - first
    );
}

#[test]
fn a_command_killed_by_a_signal_reports_the_signal() {
    let r = session(
        req(&["sh", "-c", "kill -TERM $$"]),
        vec![Message::StdinClosed],
    );
    assert_eq!(r.exit(), ExitStatus::Signal(libc::SIGTERM));
}

#[test]
fn a_signal_from_the_host_reaches_the_command() {
    let start = Instant::now();
    let r = session(req(&["sleep", "30"]), vec![Message::Signal(libc::SIGTERM)]);
    assert_eq!(r.exit(), ExitStatus::Signal(libc::SIGTERM));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_signal_reaches_the_whole_process_group() {
    // the shell waits for its child; SIGKILL to the group ends both at once
    let r = session(
        req(&["sh", "-c", "sleep 30; echo not reached"]),
        vec![Message::Signal(libc::SIGKILL)],
    );
    assert_eq!(r.exit(), ExitStatus::Signal(libc::SIGKILL));
    assert_eq!(r.stdout_str(), "");
}

#[test]
fn not_found_in_path() {
    let r = session(req(&["no-such-command-for-guest-init"]), Vec::new());
    let (kind, message) = r.error();
    assert_eq!(kind, ErrorKind::NotFound);
    assert_eq!(
        message,
        "no-such-command-for-guest-init: executable file not found in $PATH"
    );
    assert!(
        r.milestones().is_empty(),
        "no CommandStarted for a command that never ran"
    );
}

#[test]
fn not_found_by_path() {
    let r = session(req(&["/no/such/program"]), Vec::new());
    let (kind, message) = r.error();
    assert_eq!(kind, ErrorKind::NotFound);
    assert_eq!(message, "exec /no/such/program: No such file or directory");
}

#[test]
fn a_script_with_a_missing_interpreter_says_so() {
    let script = temp_path("bad-interpreter.sh");
    std::fs::write(&script, "#!/no/such/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let r = session(req(&[script.to_str().unwrap()]), Vec::new());
    let _ = std::fs::remove_file(&script);
    let (kind, message) = r.error();
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(message.contains("interpreter"), "{message}");
}

#[test]
fn not_executable() {
    let file = temp_path("not-executable");
    std::fs::write(&file, "echo hi\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = session(req(&[file.to_str().unwrap()]), Vec::new());
    let (kind, message) = r.error();
    assert_eq!(kind, ErrorKind::NotExecutable);
    assert!(message.ends_with("Permission denied"), "{message}");

    // found through PATH but not executable: EACCES is what remains
    let dir = file.parent().unwrap().to_str().unwrap().to_string();
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    let mut rq = req(&[&name]);
    rq.env = vec![format!("PATH=/nonexistent:{dir}").into_bytes()];
    let r = session(rq, Vec::new());
    let _ = std::fs::remove_file(&file);
    assert_eq!(r.error().0, ErrorKind::NotExecutable);

    // a directory
    let r = session(req(&["/"]), Vec::new());
    assert_eq!(r.error().0, ErrorKind::NotExecutable);
}

#[test]
fn a_file_as_working_directory_is_a_setup_error() {
    let mut rq = req(&["true"]);
    rq.workdir = b"/etc/passwd".to_vec();
    let r = session(rq, Vec::new());
    let (kind, message) = r.error();
    assert_eq!(kind, ErrorKind::Setup);
    assert_eq!(message, "working directory /etc/passwd: Not a directory");
}

#[test]
fn a_missing_working_directory_is_created() {
    let dir = temp_path("workdir").join("sub");
    let mut rq = req(&["pwd"]);
    rq.workdir = dir.to_str().unwrap().as_bytes().to_vec();
    let r = session(rq, vec![Message::StdinClosed]);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    assert_eq!(r.exit(), ExitStatus::Code(0));
    assert_eq!(r.stdout_str().trim(), dir.to_str().unwrap());
}

#[test]
fn the_environment_is_exactly_the_requests() {
    let mut rq = req(&["env"]);
    rq.env = vec![
        b"PATH=/nonexistent:/usr/bin:/bin".to_vec(),
        b"FOO=bar baz".to_vec(),
        b"EMPTY=".to_vec(),
    ];
    let r = session(rq, vec![Message::StdinClosed]);
    assert_eq!(r.exit(), ExitStatus::Code(0));
    assert_eq!(
        r.stdout_str(),
        "PATH=/nonexistent:/usr/bin:/bin\nFOO=bar baz\nEMPTY=\n"
    );
}

#[test]
fn signals_are_reset_and_unblocked_for_the_command() {
    let r = session(
        req(&["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]),
        vec![Message::StdinClosed],
    );
    assert_eq!(r.exit(), ExitStatus::Code(0));
    assert_eq!(
        r.stdout_str(),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
}

#[test]
fn the_command_runs_in_its_own_session_with_pipes() {
    // its own session: sid == pid; stdin is a pipe
    let r = session(
        req(&[
            "sh",
            "-c",
            "test \"$(ps -o sid= -p $$ | tr -d ' ')\" = $$ && test -p /dev/stdin && echo ok",
        ]),
        vec![Message::StdinClosed],
    );
    // ps may be missing on a minimal host: then only the pipe check is meaningful
    if r.exit() == ExitStatus::Code(0) {
        assert_eq!(r.stdout_str(), "ok\n");
    } else {
        let r = session(
            req(&["sh", "-c", "test -p /proc/self/fd/0 && echo ok"]),
            vec![Message::StdinClosed],
        );
        assert_eq!(r.stdout_str(), "ok\n");
    }
}

#[test]
fn orphans_holding_the_output_open_do_not_hold_up_the_exit() {
    let start = Instant::now();
    let r = session(
        req(&["sh", "-c", "sleep 5 & echo started"]),
        vec![Message::StdinClosed],
    );
    assert_eq!(r.exit(), ExitStatus::Code(0));
    assert_eq!(r.stdout_str(), "started\n");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn output_after_closing_the_pipes_early_and_exiting_later() {
    let r = session(
        req(&["sh", "-c", "echo early; exec >&- 2>&-; sleep 0.3; exit 5"]),
        vec![Message::StdinClosed],
    );
    assert_eq!(r.exit(), ExitStatus::Code(5));
    assert_eq!(r.stdout_str(), "early\n");
}

#[test]
fn the_user_and_group_are_switched() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // needs root
    }
    let mut rq = req(&["sh", "-c", "id -u; id -g; id -G"]);
    rq.uid = 65534;
    rq.gid = 65534;
    let r = session(rq, vec![Message::StdinClosed]);
    assert_eq!(r.exit(), ExitStatus::Code(0));
    assert_eq!(r.stdout_str(), "65534\n65534\n65534\n");
}

#[test]
fn a_bad_working_directory_for_the_user_is_a_setup_error() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // needs root
    }
    let dir = temp_path("private");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut rq = req(&["true"]);
    rq.workdir = dir.to_str().unwrap().as_bytes().to_vec();
    rq.uid = 65534;
    rq.gid = 65534;
    let r = session(rq, Vec::new());
    let _ = std::fs::remove_dir_all(&dir);
    let (kind, message) = r.error();
    assert_eq!(kind, ErrorKind::Setup);
    assert!(message.ends_with("Permission denied"), "{message}");
}

#[test]
fn the_host_going_away_kills_the_command() {
    let (guest, host) = UnixStream::pair().unwrap();
    let marker = temp_path("host-gone");
    let _ = std::fs::remove_file(&marker);
    // output every 50 ms for a second, then leave a mark
    let script = format!(
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do echo $i; sleep 0.05; done; touch {}",
        marker.display()
    );
    let guest_side = thread::spawn(move || {
        let mut chan = Channel::new(guest.into());
        serve(&mut chan, &mut Timeline::new(), &cfg())
    });
    let mut host = host;
    Message::Run(req(&["sh", "-c", &script]))
        .write_to(&mut host)
        .unwrap();
    // wait until the command runs, then hang up
    match Message::read_from(&mut host).unwrap() {
        Message::Milestone {
            milestone: Milestone::CommandStarted,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    drop(host);
    let start = Instant::now();
    let result = guest_side.join().unwrap();
    assert!(
        matches!(result, Err(SessionError::Relay(RelayError::Host(_)))),
        "{result:?}"
    );
    assert!(start.elapsed() < Duration::from_millis(500));
    thread::sleep(Duration::from_millis(1500));
    assert!(!marker.exists(), "the command outlived the connection");
}

#[test]
fn a_half_close_from_the_host_is_the_end_of_stdin() {
    let (guest, host) = UnixStream::pair().unwrap();
    let guest_side = thread::spawn(move || {
        let mut chan = Channel::new(guest.into());
        serve(&mut chan, &mut Timeline::new(), &cfg())
    });
    let mut host = host;
    Message::Run(req(&["sh", "-c", "cat; sleep 0.2; echo done"]))
        .write_to(&mut host)
        .unwrap();
    Message::Stdin(b"a\n".to_vec()).write_to(&mut host).unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let mut last = None;
    loop {
        match Message::read_from(&mut host) {
            Ok(Message::Stdout(d)) => out.extend(d),
            Ok(m) => last = Some(m),
            Err(ReadError::Closed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(String::from_utf8_lossy(&out), "a\ndone\n");
    assert_eq!(last, Some(Message::Exit(ExitStatus::Code(0))));
    assert!(matches!(
        guest_side.join().unwrap(),
        Ok(Outcome::Exited(ExitStatus::Code(0)))
    ));
}

#[test]
fn a_malformed_frame_from_the_host_ends_the_session() {
    let (guest, mut host) = UnixStream::pair().unwrap();
    let guest_side = thread::spawn(move || {
        let mut chan = Channel::new(guest.into());
        serve(&mut chan, &mut Timeline::new(), &cfg())
    });
    Message::Run(req(&["sleep", "30"]))
        .write_to(&mut host)
        .unwrap();
    // an unknown frame type
    host.write_all(&[0, 0, 0, 0, 200]).unwrap();
    let result = guest_side.join().unwrap();
    assert!(
        matches!(result, Err(SessionError::Relay(RelayError::Protocol(_)))),
        "{result:?}"
    );
}

#[test]
fn no_run_request_in_time_is_an_error() {
    let (guest, _host) = UnixStream::pair().unwrap();
    let mut c = cfg();
    c.run_timeout = Duration::from_millis(100);
    let mut chan = Channel::new(guest.into());
    let result = serve(&mut chan, &mut Timeline::new(), &c);
    assert!(
        matches!(
            result,
            Err(SessionError::WaitingForRun(ChannelError::TimedOut(_)))
        ),
        "{result:?}"
    );
}

/// PID 1's way of reaping (signalfd for SIGCHLD, `waitpid(-1)`) needs SIGCHLD blocked in every
/// thread of the process, and reaps every child: so it runs in a process of its own, this test
/// binary again, started with SIGCHLD blocked (signal masks survive exec, and libtest's threads
/// inherit it) and made a child subreaper, so that orphans come to it as they come to PID 1.
#[test]
fn pid1_mode_reaps_orphans_and_reports_the_command() {
    const HELPER: &str = "GUEST_INIT_PID1_HELPER";
    if std::env::var_os(HELPER).is_some() {
        return pid1_helper();
    }
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "session::tests::pid1_mode_reaps_orphans_and_reports_the_command",
        "--test-threads=1",
        "--nocapture",
    ])
    .env(HELPER, "1");
    // SAFETY: the closure only calls sigprocmask (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(crate::reaper::block_sigchld);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helper failed:\n{text}");
    assert!(text.contains("1 passed"), "helper ran no test:\n{text}");
}

fn pid1_helper() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let blocked = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    assert_ne!(
        blocked & (1 << (libc::SIGCHLD - 1)),
        0,
        "SIGCHLD is not blocked"
    );
    // SAFETY: prctl with plain integer arguments.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);

    let mut c = cfg();
    c.reap = ReapMode::AllChildren;
    // an orphan that exits while the command still runs, one that outlives it holding stdout, and
    // a command that exits with 4
    let r = session_with(
        Vec::new(),
        req(&[
            "sh",
            "-c",
            "(sleep 0.1 &); (sleep 0.6 &); echo hi; sleep 0.3; exit 4",
        ]),
        vec![Message::StdinClosed],
        c,
    );
    assert_eq!(r.exit(), ExitStatus::Code(4));
    assert_eq!(r.stdout_str(), "hi\n");
    // Right after the session: the first orphan has been reaped by the relay (no zombie is
    // waiting), the second still runs (the grace period, not the orphan, ended the wait).
    let mut st = 0;
    // SAFETY: `st` is a valid int for waitpid to fill in.
    let now = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
    assert_eq!(now, 0, "expected one running child and no zombie");
    // the second orphan was left alone, not mistaken for the command
    // SAFETY: as above.
    let later = unsafe { libc::waitpid(-1, &mut st, 0) };
    assert!(later > 0);
    assert_eq!(crate::reaper::exit_status(st), Some(ExitStatus::Code(0)));
}

/// The frames of one copy-in stream: the tar of `dir`'s contents in small chunks, then the end.
fn copy_in_frames(dir: &std::path::Path) -> Vec<Message> {
    let mut builder = tar::Builder::new(Vec::new());
    vmm_protocol::tree::pack(&mut builder, dir, std::path::Path::new("")).unwrap();
    let bytes = builder.into_inner().unwrap();
    bytes
        .chunks(1000)
        .map(|c| Message::CopyIn(c.to_vec()))
        .chain([Message::CopyInEnd])
        .collect()
}

/// The copy-out streams the host received: Ok(tar bytes) or Err(failure message), in order.
fn copy_out_streams(r: &Received) -> Vec<Result<Vec<u8>, String>> {
    let mut streams = Vec::new();
    let mut cur = Vec::new();
    for m in r.messages() {
        match m {
            Message::CopyOut(d) => cur.extend_from_slice(d),
            Message::CopyOutEnd => streams.push(Ok(std::mem::take(&mut cur))),
            Message::CopyOutFailed(why) => {
                cur.clear();
                streams.push(Err(why.clone()))
            }
            _ => {}
        }
    }
    streams
}

#[test]
fn copy_in_lands_before_the_command_and_copy_out_comes_back_before_exit() {
    let src = temp_path("copy-src");
    let dest = temp_path("copy-dest");
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/data"), vec![7u8; 100_000]).unwrap();
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho built > out/artifact\n").unwrap();
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("sub/data", src.join("link")).unwrap();

    let mut request = req(&["sh", "-c", "mkdir out && ./run.sh && wc -c < link"]);
    request.workdir = dest.join("ws").as_os_str().as_encoded_bytes().to_vec();
    request.copy_in = vec![request.workdir.clone()];
    let out_path = dest.join("ws/out");
    request.copy_out = vec![
        out_path.as_os_str().as_encoded_bytes().to_vec(),
        b"/no/such/path".to_vec(),
    ];
    let mut after = copy_in_frames(&src);
    after.push(Message::StdinClosed);
    let r = session(request, after);
    assert_eq!(r.exit(), ExitStatus::Code(0), "{}", r.stderr_str());
    assert_eq!(r.stdout_str().trim(), "100000");
    assert_eq!(
        std::fs::read_link(dest.join("ws/link")).unwrap(),
        PathBuf::from("sub/data")
    );

    let streams = copy_out_streams(&r);
    assert_eq!(streams.len(), 2, "{streams:?}");
    let tar_bytes = streams[0].as_ref().unwrap();
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut names = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        if name == "out/artifact" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            assert_eq!(s, "built\n");
        }
        names.push(name);
    }
    assert_eq!(names, ["out", "out/artifact"]);
    let failed = streams[1].as_ref().unwrap_err();
    assert!(failed.starts_with("/no/such/path: "), "{failed}");
    // the copy-out streams come after CommandExited and before Exit
    let kinds: Vec<&str> = r.messages().map(Message::name).collect();
    let exited = r
        .messages()
        .position(|m| {
            matches!(
                m,
                Message::Milestone {
                    milestone: Milestone::CommandExited,
                    ..
                }
            )
        })
        .unwrap();
    let first_copy = kinds.iter().position(|k| k.starts_with("CopyOut")).unwrap();
    assert!(exited < first_copy);
    assert_eq!(kinds.last(), Some(&"Exit"));
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&dest);
}

#[test]
fn a_copy_in_that_cannot_land_is_a_setup_error_and_every_stream_is_still_read() {
    let src = temp_path("copy-src-bad");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let blocker = temp_path("copy-blocker");
    std::fs::write(&blocker, b"a file, not a directory").unwrap();
    let mut request = req(&["true"]);
    request.copy_in = vec![
        blocker.as_os_str().as_encoded_bytes().to_vec(),
        b"/tmp".to_vec(),
    ];
    let mut after = copy_in_frames(&src);
    after.extend(copy_in_frames(&src));
    let r = session(request, after);
    let (kind, message) = r.error();
    assert_eq!(kind, ErrorKind::Setup);
    assert!(message.starts_with("copy-in to "), "{message}");
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_file(&blocker);
}

#[test]
fn a_copy_in_stream_broken_by_another_message_ends_the_session() {
    let mut request = req(&["true"]);
    request.copy_in = vec![temp_path("copy-broken")
        .as_os_str()
        .as_encoded_bytes()
        .to_vec()];
    let r = session(
        request,
        vec![Message::CopyIn(vec![0; 10]), Message::Hello { version: 2 }],
    );
    assert!(
        matches!(r.result, Err(SessionError::Transfer(_))),
        "{:?}",
        r.result.as_ref().map(|_| ())
    );
    let _ = std::fs::remove_dir_all(temp_path("copy-broken"));
}

#[test]
fn a_copy_in_entry_that_cannot_be_written_names_the_entry_and_the_cause() {
    let src = temp_path("copy-src-cause");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/f"), b"x").unwrap();
    let dest = temp_path("copy-dest-cause");
    let _ = std::fs::remove_dir_all(&dest);
    // `sub` exists in the target as a file: the tar's directory cannot replace it
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("sub"), b"in the way").unwrap();
    let mut request = req(&["true"]);
    request.copy_in = vec![dest.as_os_str().as_encoded_bytes().to_vec()];
    let r = session(request, copy_in_frames(&src));
    let (kind, message) = r.error();
    assert_eq!(kind, ErrorKind::Setup);
    assert!(message.contains("`sub"), "{message}");
    assert!(
        message.contains("File exists") || message.contains("Not a directory"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&dest);
}
