//! The store's own error type. The registry maps it to OCI errors in one place; nothing here
//! knows about HTTP.

use crate::oci::Digest;
use std::sync::Arc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The device is full: the write stored nothing.
    #[error("no space left on the storage device")]
    Full,
    #[error("storage I/O: {0}")]
    Io(Arc<std::io::Error>),
    /// The metadata database failed (corruption, I/O under it).
    #[error("metadata store: {0}")]
    Meta(String),
    /// The storage service (an object store) did not answer or failed; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    #[error("content digest {actual} does not match {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("tag {repo}:{tag} is immutable and already points at {current}")]
    Immutable { repo: String, tag: String, current: Digest },
    /// A compare-and-swap on a tag found another value.
    #[error("tag {repo}:{tag} changed concurrently")]
    Conflict { repo: String, tag: String },
    #[error("blob {0} is not in the store")]
    BlobMissing(Digest),
    /// A collection on another node is deleting this content right now; retrying after it
    /// stores it again.
    #[error("blob {0} is being collected: retry")]
    Sweeping(Digest),
    /// A manifest names content that is not (or no longer) in its repository.
    #[error("{what} {digest} is not in {repo}")]
    NotInRepo { repo: String, what: &'static str, digest: Digest },
    #[error("upload {0} is unknown or has expired")]
    UploadUnknown(String),
    #[error("{0}")]
    TooManyUploads(String),
    #[error("namespace {namespace} would use {would_use} of its {quota}-byte quota; delete content first")]
    Quota { namespace: String, would_use: u64, quota: u64 },
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(28) {
            return StoreError::Full;
        }
        StoreError::Io(Arc::new(e))
    }
}

macro_rules! meta_error {
    ($($t:ty),+) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Meta(e.to_string())
            }
        }
    )+};
}
meta_error!(redb::Error, redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Meta(format!("undecodable record: {e}"))
    }
}

impl From<tokio::task::JoinError> for StoreError {
    fn from(e: tokio::task::JoinError) -> Self {
        StoreError::Meta(format!("storage task failed: {e}"))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
