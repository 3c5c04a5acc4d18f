//! sendfile(2) onto a socket that pingora owns and tokio polls.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::SendMeter;

/// Bytes per call: bounds how long one call can hold a worker thread when the file is not in
/// the page cache (the read happens inside the call).
const PIECE: u64 = 4 << 20;

/// Sends `len` bytes of `file` from `offset` to the socket `fd`; returns the bytes sent. A client
/// too slow for `meter` ends it with `TimedOut`.
pub async fn send(fd: RawFd, file: &File, offset: u64, len: u64, meter: &mut SendMeter) -> io::Result<u64> {
    // The socket is already registered with the runtime under its own descriptor; a duplicate
    // gets its own registration, so we can wait for writability without touching pingora's.
    // The duplicate shares the non-blocking flag.
    // SAFETY: fcntl on a descriptor the session holds open for this whole call.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor we own; the OwnedFd inside the AsyncFd closes it.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
    // SAFETY: the AsyncFd owns `owned`, so the descriptor stays open and unchanged while
    // registered.
    let sock = unsafe { AsyncFd::register_with_interest(owned, Interest::WRITABLE) }?;
    let end = offset + len;
    let mut at = offset as libc::off_t;
    while (at as u64) < end {
        let (_, budget) = meter.next(end - at as u64);
        let started = Instant::now();
        let mut ready = match tokio::time::timeout(budget, sock.writable()).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "client too slow (write_timeout/min_send_rate)")),
        };
        let want = PIECE.min(end - at as u64) as usize;
        match ready.try_io(|s| {
            // SAFETY: both descriptors are open; `at` is a valid off_t the call advances.
            let n = unsafe { libc::sendfile(s.as_raw_fd(), file.as_raw_fd(), &mut at, want) };
            match n {
                n if n < 0 => Err(io::Error::last_os_error()),
                0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob file shorter than its length")),
                n => Ok(n as u64),
            }
        }) {
            Ok(r) => meter.record(r?, started.elapsed()),
            Err(_would_block) => meter.record(0, started.elapsed()),
        }
    }
    Ok(len)
}
