//! A response as policy produces it; the pingora layer writes it out.

use crate::oci::OciError;
use bytes::Bytes;
use futures::stream::BoxStream;
use std::fs::File;

pub enum Body {
    Empty,
    Full(Bytes),
    /// `len` bytes of `file` from `offset`.
    File {
        file: File,
        offset: u64,
        len: u64,
    },
    /// Bytes as they arrive (a blob still filling from upstream); `len` is the total.
    Stream {
        stream: BoxStream<'static, std::io::Result<Bytes>>,
        len: Option<u64>,
    },
}

impl Body {
    pub fn len(&self) -> Option<u64> {
        match self {
            Body::Empty => Some(0),
            Body::Full(b) => Some(b.len() as u64),
            Body::File { len, .. } => Some(*len),
            Body::Stream { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Body,
    /// Set when the body length differs from what `body` carries (HEAD answers).
    pub content_length: Option<u64>,
}

impl Response {
    pub fn new(status: u16) -> Self {
        Response { status, headers: Vec::new(), body: Body::Empty, content_length: None }
    }
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }
    pub fn json(self, body: Bytes) -> Self {
        self.header("Content-Type", "application/json").body(Body::Full(body))
    }
    pub fn error(e: &OciError) -> Self {
        let mut r = Response::new(e.status()).json(e.to_json().into());
        if let Some(v) = &e.retry_after {
            r = r.header("Retry-After", v.clone());
        } else if e.status() == 429 || e.status() == 503 {
            r = r.header("Retry-After", "10");
        }
        r
    }
    pub fn get_header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}
