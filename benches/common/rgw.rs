//! A throwaway Ceph RADOS Gateway for a benchmark (scripts/rgw), stopped when dropped. Needs the
//! tests' common module as `crate::common`.

use crate::common;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The gateway, stopped when the run ends.
pub struct Rgw {
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rgw {
    /// Starts the gateway and points the tests' harness at it: every berth started after this
    /// stores on its bucket (`BERTH_TEST_BACKEND=s3` and the `BERTH_TEST_S3_*` settings).
    pub fn start() -> Rgw {
        // The machine's AWS_* variables (a CA bundle among them) are meant for other endpoints;
        // neither berth nor the S3 clients here may pick them up.
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                std::env::remove_var(k);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("rgw");
        let script = common::repo_root().join("scripts/rgw");
        common::cmd::run(Command::new(&script).arg("start").arg(&state), Duration::from_secs(120)).expect_ok();
        for line in std::fs::read_to_string(state.join("env")).unwrap().lines() {
            if let Some((k, v)) = line.split_once('=') {
                std::env::set_var(k, v);
            }
        }
        std::env::set_var("BERTH_TEST_BACKEND", "s3");
        Rgw { state, _dir: dir }
    }
}

impl Drop for Rgw {
    fn drop(&mut self) {
        let _ = Command::new(common::repo_root().join("scripts/rgw")).arg("stop").arg(&self.state).status();
    }
}
