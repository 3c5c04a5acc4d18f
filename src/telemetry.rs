//! Logging setup: human-readable by default, JSON on request. The access line, written once
//! per request, has a formatter of its own: the generic one (field visitors, dynamic dispatch,
//! a fresh timestamp format per event) cost a quarter of a manifest GET's CPU. It writes the
//! same line the generic formatter would, honours the same filter (`target: "access"`), and
//! goes out as one write.

use crate::config::LogFormat;
use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| EnvFilter::new(format!("{level},pingora=warn")));
    // Colour only for a person at a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let _ = FORMAT.set(format);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// One request, as the access log records it.
pub struct Access<'a> {
    pub method: &'a str,
    pub route: &'static str,
    pub repository: &'a str,
    pub user: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub duration_ms: f64,
    pub cache: &'a str,
    pub upstream: &'a str,
    pub error: &'a str,
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// Writes the access line for one request, if the filter lets `access` lines through.
pub fn access(a: &Access<'_>) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    let format = FORMAT.get().copied().unwrap_or_default();
    LINE.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        format_access(&mut buf, format, std::time::SystemTime::now(), a);
        // One write: lines from concurrent requests never interleave.
        let _ = std::io::stderr().lock().write_all(&buf);
    });
}

fn format_access(out: &mut Vec<u8>, format: LogFormat, now: std::time::SystemTime, a: &Access<'_>) {
    let ts = humantime::format_rfc3339_micros(now);
    let mut num = itoa::Buffer::new();
    match format {
        LogFormat::Text => {
            let _ = write!(
                out,
                "{ts}  INFO access: method={} route={:?} repository={:?} user={:?} status=",
                a.method, a.route, a.repository, a.user
            );
            out.extend_from_slice(num.format(a.status).as_bytes());
            out.extend_from_slice(b" bytes=");
            out.extend_from_slice(num.format(a.bytes).as_bytes());
            let _ = writeln!(out, " duration_ms={} cache={:?} upstream={:?} error={:?}", a.duration_ms, a.cache, a.upstream, a.error);
        }
        LogFormat::Json => {
            // `,"key":` then the value: strings through serde_json's escaping, numbers as they are.
            let key = |out: &mut Vec<u8>, k: &str| {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(k.as_bytes());
                out.extend_from_slice(b"\":");
            };
            let text = |out: &mut Vec<u8>, k: &str, v: &str| {
                key(out, k);
                let _ = serde_json::to_writer(&mut *out, v);
            };
            let _ = write!(out, "{{\"timestamp\":\"{ts}\",\"level\":\"INFO\",\"fields\":{{\"method\":");
            let _ = serde_json::to_writer(&mut *out, a.method);
            text(out, "route", a.route);
            text(out, "repository", a.repository);
            text(out, "user", a.user);
            key(out, "status");
            out.extend_from_slice(num.format(a.status).as_bytes());
            key(out, "bytes");
            out.extend_from_slice(num.format(a.bytes).as_bytes());
            // Always a JSON float (1.0, not 1), as the generic formatter writes an f64.
            let d = if a.duration_ms.is_finite() { a.duration_ms } else { 0.0 };
            key(out, "duration_ms");
            let _ = write!(out, "{d:?}");
            text(out, "cache", a.cache);
            text(out, "upstream", a.upstream);
            text(out, "error", a.error);
            out.extend_from_slice(b"},\"target\":\"access\"}\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(format: LogFormat) -> String {
        let a = Access {
            method: "GET",
            route: "manifest",
            repository: "team/\"app\"",
            user: "-",
            status: 200,
            bytes: 1234,
            duration_ms: 0.25,
            cache: "hit",
            upstream: "-",
            error: "",
        };
        let mut out = Vec::new();
        format_access(&mut out, format, std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_500_000), &a);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn text_line_reads_like_the_other_log_lines() {
        assert_eq!(
            line(LogFormat::Text),
            "1970-01-01T00:00:01.500000Z  INFO access: method=GET route=\"manifest\" repository=\"team/\\\"app\\\"\" user=\"-\" \
             status=200 bytes=1234 duration_ms=0.25 cache=\"hit\" upstream=\"-\" error=\"\"\n"
        );
    }

    #[test]
    fn json_line_is_one_valid_object() {
        let l = line(LogFormat::Json);
        assert!(l.ends_with('\n') && l.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["target"], "access");
        assert_eq!(v["fields"]["repository"], "team/\"app\"");
        assert_eq!(v["fields"]["status"], 200);
        assert!(v["fields"]["duration_ms"].is_f64() && v["fields"]["bytes"].is_u64());
    }
}
