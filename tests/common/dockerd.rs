//! A private docker daemon for one test: its own data, exec and socket paths in a temp dir, no
//! networking of its own, vfs storage, optionally `--registry-mirror` pointing at berth. Uses
//! sibling `cmd.rs` only.
//!
//! dockerd (and the containerd it starts, and `ctr`) fall back to the real registry when a
//! mirror fails. Every one of them runs with an HTTP(S) proxy on a closed loopback port, which
//! Go never uses for loopback addresses: the mirror is reached directly, and any fallback to a
//! public registry fails at once, so a mirror error fails the test instead of hanging it or
//! reaching the internet.
#![allow(dead_code)]

use super::cmd::{self, Output};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Nothing listens on port 1 of loopback: connections are refused immediately.
pub const DEAD_PROXY: &str = "http://127.0.0.1:1";

/// Where a containerd run by the system listens; dockerd uses it rather than start its own.
const SYSTEM_CONTAINERD: &str = "/run/containerd/containerd.sock";

const CLIENT_LIMIT: Duration = Duration::from_secs(180);

pub fn no_internet(cmd: &mut Command) -> &mut Command {
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        cmd.env(k, DEAD_PROXY);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost").env("no_proxy", "127.0.0.1,localhost")
}

/// Daemons in one test binary take turns, so no test depends on two daemons (each with its own
/// containerd, cgroups and mounts) sharing the machine, or on a start racing another's load
/// against the readiness deadline. Test binaries already run one after another.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub struct Dockerd {
    /// Released after `drop` has stopped the daemon (fields drop after `Drop::drop`).
    _turn: std::sync::MutexGuard<'static, ()>,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub log: PathBuf,
}

impl Dockerd {
    /// Starts dockerd; `mirror` is a `--registry-mirror` URL.
    pub fn start(mirror: Option<&str>) -> Dockerd {
        Self::start_with(mirror, &[])
    }

    /// As `start`, with more daemon flags (e.g. `--insecure-registry=127.0.0.1:PORT`).
    pub fn start_with(mirror: Option<&str>, flags: &[String]) -> Dockerd {
        // A test that failed while holding the turn poisons the lock; the daemon is gone anyway.
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| dir.path().join(s);
        std::fs::create_dir_all(p("cli")).unwrap();
        let log = p("dockerd.log");
        let sock = p("docker.sock");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--data-root")
            .arg(p("root"))
            .arg("--exec-root")
            .arg(p("exec"))
            .arg("--pidfile")
            .arg(p("dockerd.pid"))
            .arg(format!("--host=unix://{}", sock.display()))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none", "--storage-driver=vfs"]);
        if let Some(m) = mirror {
            cmd.arg(format!("--registry-mirror={m}"));
        }
        // dockerd attaches to a containerd already running at the system path instead of
        // starting its own (a CI machine where the packages started their services): a
        // namespace of its own keeps its containers apart from everyone else's there.
        let ns: String = dir.path().file_name().unwrap().to_string_lossy().chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        cmd.arg(format!("--containerd-namespace=berth-test-{ns}")).arg(format!("--containerd-plugins-namespace=berth-test-{ns}-plugins"));
        cmd.args(flags);
        no_internet(&mut cmd);
        let child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().expect("dockerd starts");
        let mut d = Dockerd { _turn: turn, child: Some(child), dir, sock, log };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(s) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("dockerd exited with {s}:\n{}", self.log_text());
            }
            if self.sock.exists() && self.containerd_sock().exists() {
                let out = cmd::run(self.docker_cmd().args(["version", "--format", "{{.Server.Version}}"]), Duration::from_secs(10));
                if out.ok {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("dockerd did not become ready:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The containerd that dockerd started for itself, or the system's that it attached to.
    pub fn containerd_sock(&self) -> PathBuf {
        let own = self.dir.path().join("exec/containerd/containerd.sock");
        if own.exists() || !std::path::Path::new(SYSTEM_CONTAINERD).exists() {
            own
        } else {
            PathBuf::from(SYSTEM_CONTAINERD)
        }
    }

    fn docker_cmd(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H").arg(format!("unix://{}", self.sock.display()));
        // A private client config: nothing from the machine's ~/.docker (credential helpers,
        // contexts) takes part.
        c.env("DOCKER_CONFIG", self.dir.path().join("cli"));
        no_internet(&mut c);
        c
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        cmd::run(self.docker_cmd().args(args), CLIENT_LIMIT)
    }

    /// `ctr` against dockerd's containerd in namespace `ns`.
    pub fn ctr(&self, ns: &str, args: &[&str]) -> Output {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(self.containerd_sock()).args(["-n", ns]).args(args);
        no_internet(&mut c);
        cmd::run(&mut c, CLIENT_LIMIT)
    }

    fn pid_in(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join(file)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }
}

fn alive(pid: &str) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn signal(sig: &str, pid: &str) {
    let _ = Command::new("kill").args([sig, pid]).stderr(Stdio::null()).status();
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let containerd = self.pid_in("exec/containerd/containerd.pid");
        if let Some(mut child) = self.child.take() {
            // SIGTERM lets dockerd stop its containers and containerd and unmount what it mounted.
            signal("-TERM", &child.id().to_string());
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = containerd {
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(&pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(&pid) {
                signal("-KILL", &pid);
            }
        }
        unmount_below(self.dir.path());
    }
}

/// A daemon killed mid-way can leave mounts (container shm, netns) under its directories; they
/// would keep the temp dir from being removed and pile up on the machine. Deepest first.
fn unmount_below(dir: &std::path::Path) {
    let Ok(root) = dir.canonicalize() else { return };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // Field 5 is the mount point, with spaces and the like octal-escaped.
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(&p).stderr(Stdio::null()).status();
    }
}
