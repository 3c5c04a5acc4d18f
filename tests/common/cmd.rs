//! Running client commands (skopeo, docker, ctr) with a deadline: a client that hangs on a
//! broken mirror must fail the test, not stall the suite. Self-contained so benches can include
//! it with `#[path]` as well.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub cmdline: String,
}

impl Output {
    /// Panics with the command and both streams unless it succeeded.
    pub fn expect_ok(self) -> Output {
        assert!(self.ok, "`{}` failed\nstdout:\n{}\nstderr:\n{}", self.cmdline, self.stdout, self.stderr);
        self
    }
}

/// Runs `cmd` to completion or kills it after `limit`. Output goes through files rather than
/// pipes so a chatty child can never block on a full pipe while we poll.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let err_path = dir.path().join("err");
    let cmdline = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmdline}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let mut stderr = read(&err_path);
    if status.is_none() {
        stderr.push_str(&format!("\n[killed after {limit:?}]"));
    }
    Output { ok: status.is_some_and(|s| s.success()), stdout: read(&out_path), stderr, cmdline }
}
