//! The two errors every area shares: a filesystem or syscall failure at a path ([`IoError`]),
//! and a request that cannot be done as asked ([`UsageError`], exit status 2). Each area's own
//! error enum wraps them; `main` prints the chain once, on one line.
//!
//! Each error type that has an exit status of its own says it through [`ExitStatus`]; `main`
//! asks the error it ends with, which asks each of its causes in turn.

use std::{
    error::Error,
    io,
    path::{Path, PathBuf},
};

use crate::{
    cgroup::CgroupError, guard::GuardError, leases::LeaseError, maps::MapsError, pin::PinError,
    policy::PolicyError,
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

/// The exit status an error calls for (the man page's EXIT STATUS): [`EXIT_USAGE`] for a usage
/// or config error, [`EXIT_FAILURE`] for a runtime failure, 126 or 127 for a command `spawn`
/// cannot execute. (`status` has codes of its own for the states it finds; they are no errors.)
pub trait ExitStatus {
    fn exit_status(&self) -> u8;
}

/// A runtime failure, and any error that has no status of its own.
pub const EXIT_FAILURE: u8 = 1;
/// A usage or config error: the message names the bad value.
pub const EXIT_USAGE: u8 = 2;

/// [`EXIT_USAGE`] for bad input, else [`EXIT_FAILURE`].
fn usage_if(usage: bool) -> u8 {
    if usage {
        EXIT_USAGE
    } else {
        EXIT_FAILURE
    }
}

/// The status of the first cause, outermost first, that has one of its own; else
/// [`EXIT_FAILURE`].
impl ExitStatus for anyhow::Error {
    fn exit_status(&self) -> u8 {
        self.chain()
            .find_map(|cause| STATUS_OF.iter().find_map(|of| of(cause)))
            .unwrap_or(EXIT_FAILURE)
    }
}

/// Each error type that has a status of its own, as a question to a cause: is it one, and its
/// status if so.
const STATUS_OF: [fn(&(dyn Error + 'static)) -> Option<u8>; 9] = [
    status_as::<UsageError>,
    status_as::<ExecError>,
    status_as::<PolicyError>,
    status_as::<crate::config::ConfigError>,
    status_as::<CgroupError>,
    status_as::<PinError>,
    status_as::<LeaseError>,
    status_as::<MapsError>,
    status_as::<GuardError>,
];

fn status_as<E: ExitStatus + Error + 'static>(cause: &(dyn Error + 'static)) -> Option<u8> {
    cause.downcast_ref::<E>().map(E::exit_status)
}

impl ExitStatus for UsageError {
    fn exit_status(&self) -> u8 {
        EXIT_USAGE
    }
}

/// The shell's convention: 127 when the command does not exist, 126 when it cannot be executed.
impl ExitStatus for ExecError {
    fn exit_status(&self) -> u8 {
        if self.source.kind() == io::ErrorKind::NotFound {
            127
        } else {
            126
        }
    }
}

/// A bad value, always.
impl ExitStatus for PolicyError {
    fn exit_status(&self) -> u8 {
        EXIT_USAGE
    }
}

// The areas' own enums tell bad input from a runtime failure themselves (`is_usage`), each
// asking the errors it wraps.

impl ExitStatus for CgroupError {
    fn exit_status(&self) -> u8 {
        usage_if(self.is_usage())
    }
}

impl ExitStatus for PinError {
    fn exit_status(&self) -> u8 {
        usage_if(self.is_usage())
    }
}

impl ExitStatus for LeaseError {
    fn exit_status(&self) -> u8 {
        usage_if(self.is_usage())
    }
}

impl ExitStatus for MapsError {
    fn exit_status(&self) -> u8 {
        usage_if(self.is_usage())
    }
}

impl ExitStatus for GuardError {
    fn exit_status(&self) -> u8 {
        usage_if(self.is_usage())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    /// The status `main` exits with for `e`, as the first error of a chain and under a context.
    fn status(e: impl Into<anyhow::Error>) -> u8 {
        let e: anyhow::Error = e.into();
        let bare = e.exit_status();
        let under_context = e.context("doing something").exit_status();
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
        assert_eq!(deep.exit_status(), 2);
        // A config file's bad value: the config error comes first and says 2.
        let in_file = ConfigError::PolicyIn {
            path: PathBuf::from("c.toml"),
            source: usage_policy(),
        };
        assert_eq!(anyhow::Error::new(in_file).exit_status(), 2);
    }
}
