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

#[cfg(test)]
mod tests {
    use std::{io, path::PathBuf};

    use super::*;
    use crate::{
        cgroup::CgroupError, config::ConfigError, guard::GuardError, leases::LeaseError,
        maps::MapsError, pin::PinError, policy::PolicyError,
    };

    /// The status `main` exits with for `e`, as the first error of a chain and under a context.
    fn status(e: impl Into<anyhow::Error>) -> u8 {
        let e: anyhow::Error = e.into();
        let bare = crate::exit_code(&e);
        let under_context = crate::exit_code(&e.context("doing something"));
        assert_eq!(bare, under_context, "a context changes nothing");
        bare
    }

    fn io_error() -> IoError {
        IoError::new(
            "open",
            "/x",
            io::Error::from(io::ErrorKind::PermissionDenied),
        )
    }

    fn usage_policy() -> PolicyError {
        PolicyError::Mode("x".into())
    }

    fn usage_pin() -> PinError {
        PinError::Relative(PathBuf::from("x"))
    }

    fn usage_cgroup() -> CgroupError {
        "x".parse::<crate::cgroup::CgroupPath>().unwrap_err()
    }

    /// Each error type, and each of its variants that wraps another, to its exit status (the man
    /// page's EXIT STATUS: 2 usage or config, 1 runtime, 126/127 a command spawn cannot exec).
    #[test]
    fn each_error_has_its_exit_status() {
        // Not one of ours: a runtime failure.
        assert_eq!(status(anyhow::anyhow!("anything")), 1);
        assert_eq!(status(io_error()), 1);

        assert_eq!(status(UsageError::new("two options that conflict")), 2);
        assert_eq!(status(usage_policy()), 2);

        let exec = |kind| ExecError {
            command: "x".into(),
            source: io::Error::from(kind),
        };
        assert_eq!(status(exec(io::ErrorKind::NotFound)), 127);
        assert_eq!(status(exec(io::ErrorKind::PermissionDenied)), 126);

        assert_eq!(status(usage_cgroup()), 2);
        assert_eq!(
            status(CgroupError::Missing {
                path: crate::cgroup::CgroupPath::root(),
                dir: PathBuf::from("/sys/fs/cgroup"),
            }),
            2
        );
        assert_eq!(status(CgroupError::NoMount), 1);
        assert_eq!(status(CgroupError::Io(io_error())), 1);

        assert_eq!(
            status(ConfigError::Parse {
                path: PathBuf::from("c.toml"),
                message: "x".into(),
            }),
            2
        );
        assert_eq!(status(ConfigError::Policy(usage_policy())), 2);
        assert_eq!(status(ConfigError::Metrics("x".into())), 2);
        assert_eq!(status(ConfigError::Cgroup(usage_cgroup())), 2);
        assert_eq!(status(ConfigError::Cgroup(CgroupError::NoMount)), 1);

        assert_eq!(status(usage_pin()), 2);
        assert_eq!(status(PinError::NotLoaded(PathBuf::from("/p"))), 1);
        assert_eq!(status(PinError::Io(io_error())), 1);

        assert_eq!(
            status(LeaseError::NotReserved {
                port: 1,
                ranges: "2-3".into(),
            }),
            2
        );
        assert_eq!(status(LeaseError::NotLeased(1)), 1);

        assert_eq!(status(MapsError::Policy(usage_policy())), 2);
        assert_eq!(status(MapsError::Pin(usage_pin())), 2);
        assert_eq!(
            status(MapsError::Pin(PinError::NotLoaded(PathBuf::from("/p")))),
            1
        );
        assert_eq!(status(MapsError::Lease(LeaseError::NotLeased(1))), 1);
        assert_eq!(status(MapsError::Io(io_error())), 1);

        assert_eq!(
            status(GuardError::Maps(MapsError::Policy(usage_policy()))),
            2
        );
        assert_eq!(status(GuardError::PinDir(usage_pin())), 2);
        assert_eq!(status(GuardError::Cgroup(usage_cgroup())), 2);
        assert_eq!(status(GuardError::Cgroup(CgroupError::NoMount)), 1);
        assert_eq!(status(GuardError::Io(io_error())), 1);
    }

    /// The first cause that has a status of its own decides, however deep it is.
    #[test]
    fn the_first_cause_with_a_status_decides() {
        let deep = anyhow::Error::new(UsageError::new("x"))
            .context("one")
            .context("two");
        assert_eq!(crate::exit_code(&deep), 2);
        // A config file's bad value: the config error comes first and says 2.
        let in_file = ConfigError::PolicyIn {
            path: PathBuf::from("c.toml"),
            source: usage_policy(),
        };
        assert_eq!(crate::exit_code(&anyhow::Error::new(in_file)), 2);
    }
}
