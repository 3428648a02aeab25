//! What can go wrong loading, keeping and unloading the guard.

use aya::{
    programs::{links::LinkError, ProgramError},
    EbpfError,
};

use crate::{
    cgroup::CgroupError, ephemeral::EphemeralError, error::IoError, maps::MapsError, pin::PinError,
};

/// A guard problem at run time (exit status 1 unless it wraps a usage error).
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Loading the object failed.
    #[error("loading the eBPF object")]
    Load(#[source] Box<EbpfError>),
    /// A program could not be loaded or attached.
    #[error("{what} {program}")]
    Program {
        what: &'static str,
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// A link could not be made.
    #[error("{what} link of {program}")]
    Link {
        what: &'static str,
        program: &'static str,
        #[source]
        source: Box<LinkError>,
    },
    /// A link could not be pinned.
    #[error("pin link of {program}")]
    PinLink {
        program: &'static str,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    /// The pin dir cannot be used.
    #[error(transparent)]
    PinDir(#[from] PinError),
    /// A map problem.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// A cgroup problem.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Restoring the ephemeral port sysctl failed.
    #[error(transparent)]
    Ephemeral(#[from] EphemeralError),
    /// A filesystem or syscall failure.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl GuardError {
    pub fn is_usage(&self) -> bool {
        match self {
            GuardError::Maps(e) => e.is_usage(),
            GuardError::Cgroup(e) => e.is_usage(),
            GuardError::PinDir(e) => e.is_usage(),
            _ => false,
        }
    }
}
