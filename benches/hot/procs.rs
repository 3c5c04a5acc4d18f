//! What a server costs, read from /proc: CPU seconds (utime + stime of every thread) and peak
//! resident memory (VmHWM), summed over the server's process tree (nginx runs workers).

use std::path::Path;

/// The process whose command line contains `needle`, and all its descendants.
pub fn tree(needle: &str) -> Vec<u32> {
    let mut all = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok()).unwrap_or(0);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        all.push((pid, ppid, cmd));
    }
    let me = std::process::id();
    let mut out: Vec<u32> = all.iter().filter(|(p, _, c)| *p != me && c.contains(needle)).map(|(p, _, _)| *p).collect();
    loop {
        let more: Vec<u32> = all.iter().filter(|(p, pp, _)| out.contains(pp) && !out.contains(p)).map(|(p, _, _)| *p).collect();
        if more.is_empty() {
            return out;
        }
        out.extend(more);
    }
}

fn ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn cpu_secs(pids: &[u32]) -> f64 {
    let tps = ticks_per_sec();
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|s| {
            let f: Vec<u64> = s.rsplit_once(')').unwrap().1.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
            // Fields 14 and 15 of stat(5), counted after the command name.
            (f[11] + f[12]) as f64 / tps
        })
        .sum()
}

/// Starts a fresh peak-RSS window (clear_refs "5" resets VmHWM to the current RSS).
pub fn reset_peak(pids: &[u32]) {
    for p in pids {
        let _ = std::fs::write(format!("/proc/{p}/clear_refs"), "5");
    }
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Sum of each process's peak RSS since the last `reset_peak`, MiB.
pub fn peak_rss_mib(pids: &[u32]) -> f64 {
    pids.iter().map(|p| status_kib(*p, "VmHWM:")).sum::<u64>() as f64 / 1024.0
}
