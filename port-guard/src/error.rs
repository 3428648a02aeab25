//! The two errors every area shares: a filesystem or syscall failure at a path ([`IoError`]),
//! and a request that cannot be done as asked ([`UsageError`], exit status 2). Each area's own
//! error enum wraps them; `main` prints the chain once, on one line.

use std::{
    io,
    path::{Path, PathBuf},
};

/// Operation `op` on `path` failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}")]
pub struct IoError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl IoError {
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> IoError {
        IoError {
            op,
            path: path.into(),
            source,
        }
    }

    /// The OS error number, if the failure came from the kernel.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// Whether the path does not exist: the one failure that is evidence of absence.
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }
}

/// Names the operation and the path of an `io::Result`.
pub trait IoContext<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, IoError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, IoError> {
        self.map_err(|source| IoError::new(op, path, source))
    }
}

/// A request the command line could not refuse itself (a name with a `/`, two conflicting
/// options, a cgroup that exists already): exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    pub fn new(message: impl Into<String>) -> UsageError {
        UsageError(message.into())
    }
}

/// `spawn` could not execute its command: exit status 127 when it does not exist, 126 when it
/// cannot be executed (the shell's convention).
#[derive(Debug, thiserror::Error)]
#[error("executing {command:?}")]
pub struct ExecError {
    pub command: String,
    #[source]
    pub source: io::Error,
}

impl ExecError {
    pub fn exit_code(&self) -> u8 {
        if self.source.kind() == io::ErrorKind::NotFound {
            127
        } else {
            126
        }
    }
}
