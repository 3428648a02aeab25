//! Real libvirt for the integration tests: two libvirtd + virtlogd pairs on this machine that
//! live-migrate a diskless domain between each other. No mock anywhere: Debian's libvirt 9.0
//! and qemu, started by hand (no systemd).
//!
//! - [`ensure_installed`] installs libvirt from Debian when it is missing (and the `libvirt-qemu`
//!   user and groups its qemu driver needs); `Err(reason)` where it cannot (no apt-get, e.g. the
//!   busybox guests of `cargo xtask vm-test`): the test then [`crate::skip`]s.
//! - [`Pair`] is two [`LibvirtHost`]s, each libvirtd + virtlogd in its own cgroup and its own mount
//!   and UTS namespace (own hostname, own /etc/libvirt, /run/libvirt, /var/lib/libvirt,
//!   /var/log/libvirt, /var/cache/libvirt and /etc/hosts, bind-mounted from a temp dir), with
//!   qemu.conf's migration_port_min/max set to the test's range, and one diskless domain that
//!   [`Pair::migrate`] moves back and forth.
//! - [`Allocator`] runs `pg-allocator` (probe the lowest free port, bind it a moment later, hold it)
//!   running in a cgroup of the test's.
//!
//! Everything is RAII and panic-safe. Dropping a [`Pair`] prints libvirtd's log and the qemu logs
//! when the thread is panicking, destroys the domains, kills both libvirtd and virtlogd (their
//! namespaces go with them), kills and removes what libvirt left below `/machine` (libvirt puts
//! VMs there, at the cgroup2 root and in every v1 hierarchy, when there is no systemd), removes
//! `/machine` itself when the test created it, and the mount-point directories it created.
//!
//! Two details that matter (found the hard way):
//! - The VM's cgroup is `/machine/qemu-ID-NAME.libvirt-qemu`, and both daemons number their
//!   domains from 1: a migration that keeps the name puts the destination's qemu into the
//!   source's cgroup, and the source then spends seconds failing to remove it (EBUSY). The
//!   domain is renamed on every migration (`--dname`): `<token>a` on A, `<token>b` on B.
//! - libvirt resolves its hostname (`getaddrinfo`, canonical name) in every migration phase. An
//!   unknown name goes to the DNS server, i.e. leaves the machine (and costs seconds): each
//!   namespace gets an /etc/hosts that names its host.
//! - Each libvirtd probes qemu's capabilities at start (seconds); the first one's cache is reused
//!   by the others of the test process.
//!
//! `PG_LIBVIRT_LOGS=DIR` keeps every host's libvirtd, virtlogd and qemu logs in DIR.
//!
//! One concern a file: `install` (apt-get, the qemu user), `cleanup` (what a killed run or a
//! test's domains leave behind), `host` (one libvirtd + virtlogd, the domain XML), `caps` (qemu's
//! capabilities probed once per process), `pair` (two hosts and the domain that migrates between
//! them), `allocator` (pg-allocator, another port allocator on the host); and the tests' own
//! world: `config` (contrib/libvirt-host.toml as a test runs it), `guard` (the port-guard
//! daemon, its log in a file), `env` ([`LibvirtEnv`]: all of it for one test).

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    time::Duration,
};

mod allocator;
mod caps;
mod cleanup;
mod config;
mod env;
mod guard;
mod host;
mod install;
mod pair;

pub use allocator::{Allocator, Pace};
pub use cleanup::{sweep_dead_runs, MachineCleanup};
pub use config::host_config;
pub use env::{BindAttempts, LibvirtEnv, PACE};
pub use guard::{guard_lines, Guard};
pub use host::{disk_path, disk_pattern, domain_xml, LibvirtHost};
pub use install::{ensure_installed, find_program};
pub use pair::{assert_libvirt_layout, describe, Migration, Pair};

/// Upper bound of one `virsh` call that is not a migration.
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound of one `virsh migrate`.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long libvirtd may take to come up (it probes qemu's capabilities first: a few seconds).
pub const LIBVIRTD_START_TIMEOUT: Duration = Duration::from_secs(120);

/// The qemu binary libvirt starts.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// What `apt-get install` gets when libvirt is missing (`--no-install-recommends`: no
/// libvirt-daemon-system, which wants systemd and would start a system libvirtd).
pub const LIBVIRT_PACKAGES: &[&str] = &[
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
];

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `net.ipv4.ip_local_reserved_ports` of this network namespace.
pub fn reserved_ports() -> String {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .expect("read net.ipv4.ip_local_reserved_ports")
        .trim_end()
        .to_owned()
}

/// The cgroup2 path of `pid` ("0::" line of /proc/PID/cgroup).
pub fn cgroup_of(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// Every cgroup (v1 and v2) mount point, from /proc/self/mountinfo.
fn cgroup_mounts() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mount = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| crate::cgroup::unescape_mountinfo(mount))
        })
        .collect()
}

fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn cstring(p: impl AsRef<Path>) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).expect("path without NUL")
}
