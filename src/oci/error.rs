//! The OCI error table: code, HTTP status and default message, defined once.
//! Pure protocol layer: no I/O, no pingora.

use serde::Serialize;

macro_rules! error_codes {
    ($($variant:ident => ($code:literal, $status:literal, $message:literal)),+ $(,)?) => {
        /// Error codes of the OCI distribution spec (plus the Docker registry's extras).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode { $($variant),+ }

        impl ErrorCode {
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code),+ }
            }
            pub fn status(self) -> u16 {
                match self { $(ErrorCode::$variant => $status),+ }
            }
            pub fn default_message(self) -> &'static str {
                match self { $(ErrorCode::$variant => $message),+ }
            }
        }
    };
}

error_codes! {
    BlobUnknown => ("BLOB_UNKNOWN", 404, "blob unknown to registry"),
    BlobUploadInvalid => ("BLOB_UPLOAD_INVALID", 400, "blob upload invalid"),
    BlobUploadUnknown => ("BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"),
    DigestInvalid => ("DIGEST_INVALID", 400, "provided digest did not match uploaded content"),
    ManifestBlobUnknown => ("MANIFEST_BLOB_UNKNOWN", 400, "manifest references a manifest or blob unknown to registry"),
    ManifestInvalid => ("MANIFEST_INVALID", 400, "manifest invalid"),
    ManifestUnknown => ("MANIFEST_UNKNOWN", 404, "manifest unknown to registry"),
    NameInvalid => ("NAME_INVALID", 400, "invalid repository name"),
    NameUnknown => ("NAME_UNKNOWN", 404, "repository name not known to registry"),
    SizeInvalid => ("SIZE_INVALID", 400, "provided length did not match content length"),
    TooLarge => ("SIZE_INVALID", 413, "content exceeds the size limit"),
    RangeInvalid => ("BLOB_UPLOAD_INVALID", 416, "requested range not satisfiable"),
    Unauthorized => ("UNAUTHORIZED", 401, "authentication required"),
    Denied => ("DENIED", 403, "requested access to the resource is denied"),
    Unsupported => ("UNSUPPORTED", 400, "the operation is unsupported"),
    MethodNotAllowed => ("UNSUPPORTED", 405, "method not allowed"),
    TooManyRequests => ("TOOMANYREQUESTS", 429, "too many requests"),
    UpstreamUnavailable => ("UNAVAILABLE", 502, "upstream registry unavailable"),
    UpstreamTimeout => ("UNAVAILABLE", 504, "upstream registry timed out"),
    UpstreamDown => ("UNAVAILABLE", 503, "upstream registry is failing"),
    InsufficientStorage => ("UNAVAILABLE", 507, "insufficient storage"),
    StorageUnavailable => ("UNAVAILABLE", 503, "storage unavailable"),
    BadRequest => ("UNSUPPORTED", 400, "malformed request"),
    RequestTimeout => ("UNSUPPORTED", 408, "request timeout"),
    HeadTooLarge => ("UNSUPPORTED", 431, "request header fields too large"),
    NotImplemented => ("UNSUPPORTED", 501, "not implemented"),
    Internal => ("UNKNOWN", 500, "internal server error"),
}

/// One error as the registry reports it to clients.
#[derive(Debug, Clone)]
pub struct OciError {
    pub code: ErrorCode,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    /// `Retry-After` for the answer, when someone (an upstream) said when to retry.
    pub retry_after: Option<String>,
}

impl OciError {
    pub fn new(code: ErrorCode) -> Self {
        Self { code, message: code.default_message().to_string(), detail: None, retry_after: None }
    }
    pub fn msg(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), detail: None, retry_after: None }
    }
    pub fn with_retry_after(mut self, v: Option<String>) -> Self {
        self.retry_after = v;
        self
    }
    pub fn detail(mut self, detail: impl Serialize) -> Self {
        self.detail = serde_json::to_value(detail).ok();
        self
    }
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// The JSON envelope `{"errors":[{"code","message","detail"}]}`.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Item<'a> {
            code: &'a str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            detail: Option<&'a serde_json::Value>,
        }
        #[derive(Serialize)]
        struct Envelope<'a> {
            errors: [Item<'a>; 1],
        }
        serde_json::to_vec(&Envelope { errors: [Item { code: self.code.as_str(), message: &self.message, detail: self.detail.as_ref() }] })
            .expect("error envelope serializes")
    }
}

impl std::fmt::Display for OciError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for OciError {}

impl From<std::io::Error> for OciError {
    fn from(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(28) {
            return OciError::msg(ErrorCode::InsufficientStorage, "no space left on the storage device");
        }
        OciError::msg(ErrorCode::Internal, format!("storage error: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape() {
        let e = OciError::msg(ErrorCode::BlobUnknown, "nope").detail(serde_json::json!({"digest":"x"}));
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(v["errors"][0]["message"], "nope");
        assert_eq!(v["errors"][0]["detail"]["digest"], "x");
        assert_eq!(e.status(), 404);
    }

    #[test]
    fn enospc_maps_to_507() {
        let e: OciError = std::io::Error::from_raw_os_error(28).into();
        assert_eq!(e.status(), 507);
    }
}
