//! The one place storage errors become OCI errors.

use crate::oci::{ErrorCode, OciError};
use crate::store::StoreError;

impl From<StoreError> for OciError {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        match e {
            StoreError::Full => OciError::msg(ErrorCode::InsufficientStorage, msg),
            StoreError::Unavailable(_) | StoreError::Sweeping(_) => OciError::msg(ErrorCode::StorageUnavailable, msg),
            StoreError::Io(_) | StoreError::Meta(_) => OciError::msg(ErrorCode::Internal, format!("storage error: {msg}")),
            StoreError::DigestMismatch { expected, actual } => OciError::msg(ErrorCode::DigestInvalid, msg)
                .detail(serde_json::json!({"expected": expected.to_string(), "actual": actual.to_string()})),
            StoreError::Immutable { .. } => OciError::msg(ErrorCode::Denied, msg),
            StoreError::Quota { namespace, would_use, quota } => OciError::msg(ErrorCode::Denied, msg)
                .detail(serde_json::json!({"namespace": namespace, "quota": quota, "wouldUse": would_use})),
            // Another writer moved the tag between the caller's read and its write.
            StoreError::Conflict { .. } => OciError::msg(ErrorCode::TooManyRequests, format!("{msg}; retry")),
            StoreError::BlobMissing(d) => OciError::msg(ErrorCode::BlobUnknown, msg).detail(serde_json::json!({"digest": d.to_string()})),
            StoreError::NotInRepo { digest, .. } => {
                OciError::msg(ErrorCode::ManifestBlobUnknown, msg).detail(serde_json::json!({"digest": digest.to_string()}))
            }
            StoreError::UploadUnknown(_) => OciError::msg(ErrorCode::BlobUploadUnknown, msg),
            StoreError::TooManyUploads(_) => OciError::msg(ErrorCode::TooManyRequests, msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_failures_are_never_not_found() {
        let io: OciError = StoreError::from(std::io::Error::other("disk on fire")).into();
        assert_eq!(io.status(), 500);
        let full: OciError = StoreError::from(std::io::Error::from_raw_os_error(28)).into();
        assert_eq!(full.status(), 507);
        let many: OciError = StoreError::TooManyUploads("x".into()).into();
        assert_eq!((many.status(), many.code.as_str()), (429, "TOOMANYREQUESTS"));
    }
}
