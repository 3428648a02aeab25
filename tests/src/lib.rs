//! Test harness for the `port-guard` integration tests.
//!
//! Everything here is RAII and panic-safe: whatever a test creates (cgroups, pin dirs, temp
//! dirs, daemons, helper processes) is torn down in `Drop`, even when an assertion fails half
//! way through the test.
//!
//! - [`cgroup2_mount`]: where cgroup2 is mounted (from /proc/self/mountinfo, never hard-coded).
//! - [`TestCgroup`] / [`Cgroup`]: a test's own cgroup subtree; binds and helper processes run in
//!   its children.
//! - [`PinDir`]: a test's own bpffs pin dir, unloaded and removed on drop.
//! - [`TempDir`]: a scratch dir (config files).
//! - [`Daemon`]: a running `port-guard daemon` whose stderr is collected line by line.
//! - [`bind_in`] / [`bind_in_pid`]: a real forked process that moves itself into a cgroup and
//!   calls bind(2); the errno is reported back.
//! - [`Holder`]: a forked process parked in a cgroup (keeps it populated).
//! - [`insert_lease`] / [`remove_lease`]: write the pinned `PG_LEASES` map directly with aya.
//! - [`LeaseEnv`]: the guard of the lease and spawn tests (allowed, outsider and spawn cgroups).
//! - [`run`], [`run_cmd`], [`status_json`]: one-shot invocations of the binary.
//!
//! Tests need root. The binary is `$PORT_GUARD_BIN` or `<dir of the test exe>/../port-guard`
//! (`target/debug/port-guard` when the test runs from `target/debug/deps/`).
//!
//! Every item is re-exported here (tests `use integration_tests::*`); the modules hold one
//! concern each.

use std::time::Duration;

pub use port_guard_common as common;

mod util;
pub use util::{errno_name, exit_code, now_secs, wait_until};

mod cgroup;
pub use cgroup::{
    assert_nothing_attached, bpftool_cgroup_progs, cgroup2_mount, Cgroup, TestCgroup,
};

mod pin;
pub use pin::{remove_state_files, state_file, PinDir, TempDir};

mod cmd;
pub use cmd::{
    bin, run, run_cmd, run_cmd_timeout, scrape_metrics, status_json, status_json_code,
    wait_attached, workspace_file,
};

mod daemon;
pub use daemon::Daemon;

mod fixture;
pub use fixture::Fixture;

mod bind;
pub use bind::{
    bind_in, bind_in_pid, hold_in, BindSpec, Family, Holder, Proto, ANY4, ANY6, LO4, LO6,
    MAPPED_LO4,
};

mod leases;
pub use leases::{alloc_marked, get_lease, insert_lease, lease_for, remove_lease, set_alloc_mark};

mod lease_env;
pub use lease_env::{ports_of, LeaseEnv};

mod assert;
pub use assert::{contains_token, single_line};

mod features;
pub use features::{
    default_sentinel_reserved, expected_errno, expected_errno_without_sentinel, kernel_features,
    skip, skip_part, Features,
};

pub mod libvirt;
pub mod netns;
pub mod qemu;
pub mod sock;

/// Prefix of every cgroup, pin dir and temp dir the tests create.
pub const PREFIX: &str = "pg-test";

/// How long to wait for a daemon to start (load + attach), for log lines and for exits.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a denial line to show up after the bind.
pub const LOG_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound for one-shot commands (`status`, `unload`, failing `daemon` invocations).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
