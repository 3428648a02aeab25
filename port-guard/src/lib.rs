//! port-guard: keeps reserved ports away from processes that are not meant to have them.
//!
//! Data flows one way: config and flags → [`policy::Policy`] → kernel maps ([`guard`]) → the
//! bind4/bind6 programs decide; their events → [`events`] → the daemon's log.

pub mod alloc;
pub mod cgroup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod conflicts;
pub mod ephemeral;
pub mod events;
pub mod guard;
pub mod inotify;
pub mod leases;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod probe;
pub mod reaper;
pub mod sockets;
pub mod sys;

/// A config asks for something this version or this kernel cannot do (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub &'static str);

/// The exit status for an error: 2 for usage and config errors, 1 for runtime failures.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<config::ConfigError>() {
            return if e.is_usage() { 2 } else { 1 };
        }
        if let Some(e) = cause.downcast_ref::<cgroup::CgroupError>() {
            return if e.is_usage() { 2 } else { 1 };
        }
        if let Some(e) = cause.downcast_ref::<leases::LeaseError>() {
            return if e.is_usage() { 2 } else { 1 };
        }
        if cause.downcast_ref::<policy::PolicyError>().is_some()
            || cause.downcast_ref::<Unsupported>().is_some()
        {
            return 2;
        }
    }
    1
}
