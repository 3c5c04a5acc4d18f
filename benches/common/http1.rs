//! A sequential HTTP/1.1 client for the benchmarks: keep-alive, Content-Length or chunked
//! bodies, parsed with httparse. One thread, one connection, no pooling: latency probes want
//! exactly one request in flight.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Conn {
    s: TcpStream,
    port: u16,
    buf: Vec<u8>,
    filled: usize,
}

impl Conn {
    pub fn connect(port: u16, timeout: Duration) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        Ok(Conn { s, port, buf: vec![0; 1 << 16], filled: 0 })
    }

    fn fill(&mut self) -> std::io::Result<()> {
        if self.filled == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.s.read(&mut self.buf[self.filled..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.filled += n;
        Ok(())
    }

    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    fn line_end(&mut self) -> std::io::Result<usize> {
        loop {
            if let Some(i) = self.buf[..self.filled].windows(2).position(|w| w == b"\r\n") {
                return Ok(i);
            }
            self.fill()?;
        }
    }

    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<Resp> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: berth-bench\r\n", self.port);
        for (k, v) in headers {
            let _ = write!(head, "{k}: {v}\r\n");
        }
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            let _ = write!(head, "Content-Length: {}\r\n", body.len());
        }
        head.push_str("\r\n");
        self.s.write_all(head.as_bytes())?;
        if !body.is_empty() {
            self.s.write_all(body)?;
        }
        let (status, hdrs, n) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 48];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(&self.buf[..self.filled]).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))? {
                httparse::Status::Complete(n) => {
                    let hdrs: Vec<(String, String)> =
                        r.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned())).collect();
                    break (r.code.unwrap_or(0), hdrs, n);
                }
                httparse::Status::Partial => self.fill()?,
            }
        };
        self.consume(n);
        let mut resp = Resp { status, headers: hdrs, body: Vec::new() };
        if method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status) {
            return Ok(resp);
        }
        if resp.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let le = self.line_end()?;
                let size_text = String::from_utf8_lossy(&self.buf[..le]).to_string();
                let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| std::io::Error::other(format!("bad chunk size {size_text:?}")))?;
                self.consume(le + 2);
                while self.filled < size + 2 {
                    self.fill()?;
                }
                resp.body.extend_from_slice(&self.buf[..size]);
                self.consume(size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            let len = resp.header("content-length").and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0);
            while self.filled < len {
                self.fill()?;
            }
            resp.body.extend_from_slice(&self.buf[..len]);
            self.consume(len);
        }
        Ok(resp)
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<Resp> {
        self.request("GET", path, &[], &[])
    }
}
