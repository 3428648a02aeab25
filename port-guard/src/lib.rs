//! port-guard: keeps reserved ports away from processes that are not meant to have them.
//!
//! Data flows one way: config and flags ([`config`]) → [`policy::Policy`] → kernel maps
//! ([`maps`], loaded and attached by [`guard`], pinned in [`pin`]) → the bind4/bind6 programs
//! decide; their events → [`events`] → the daemon's log ([`daemon`]). Leases ([`leases`]) are
//! made by `spawn` and `lease` without a daemon and ended by its [`reaper`].
//!
//! The modules, by what they do: `cli` (the command line), `commands/` (one thin file per verb)
//! and `manpage`; `daemon/` (the long-running agent) and `reaper/` (which ends leases);
//! `policy`, `config`, `plan` (pure: the policy, from the file and the flags, and what a reload
//! of it would change); `cgroup/`, `pin`, `maps/`, `leases/`, `guard`, `status` (the kernel
//! state) and `state` (the agent's own files beside it); `events`, `logfmt`, `metrics`, `notify`
//! (what the daemon says); `ephemeral`, `conflicts`, `sockets`, `probe`, `netns`, `sentinel` (the
//! host around the guard); `sys`, `shared`, `inotify` (syscalls aya does not wrap); `error` (the
//! errors every area shares, and each error's exit status).

pub mod cgroup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod conflicts;
pub mod daemon;
pub mod ephemeral;
pub mod error;
pub mod events;
pub mod guard;
pub mod inotify;
pub mod leases;
pub mod logfmt;
pub mod manpage;
pub mod maps;
pub mod metrics;
pub mod netns;
pub mod notify;
pub mod pin;
pub mod plan;
pub mod policy;
pub mod probe;
pub mod reaper;
pub mod sentinel;
pub mod shared;
pub mod sockets;
pub mod state;
pub mod status;
pub mod sys;
