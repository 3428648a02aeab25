//! What the running kernel supports (from `port-guard check --json`), and how a test reports
//! that it, or a part of it, does not run here.

use crate::cmd::run;

/// What the running kernel lets the guard do, from `port-guard check --json` (cached).
#[derive(Clone, Copy, Debug)]
pub struct Features {
    /// Refused binds get the configured errno (bpf_set_retval, 6.1+); EPERM otherwise.
    pub set_retval: bool,
    /// Without it, EADDRINUSE comes through the sentinel port (the default config).
    pub sentinel: bool,
}

pub fn kernel_features() -> Features {
    static CACHE: std::sync::OnceLock<Features> = std::sync::OnceLock::new();
    *CACHE.get_or_init(|| {
        let (_, out, err) = run(&[
            "--pin-dir",
            "/nonexistent-pg-test-pin",
            "--config",
            "/dev/null",
            "check",
            "--json",
        ]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("check --json: {e}: {out} {err}"));
        Features {
            set_retval: v["features"]["set_retval"]
                .as_bool()
                .expect("features.set_retval in check --json"),
            sentinel: v["features"]["sentinel"]
                .as_bool()
                .expect("features.sentinel in check --json"),
        }
    })
}

/// The errno a refused bind gets with `errno = "eaddrinuse"` in a netns the daemon holds the
/// sentinel port in (its own and every listed one): EADDRINUSE on every kernel, set by the
/// program (6.1+) or through the sentinel.
pub fn expected_errno() -> i32 {
    let f = kernel_features();
    if f.set_retval || f.sentinel {
        libc::EADDRINUSE
    } else {
        libc::EPERM
    }
}

/// The errno a refused bind gets with `errno = "eaddrinuse"` in a netns without a sentinel (one
/// `netns = ["all"]` reaches but does not list): EADDRINUSE where the kernel sets it, else EPERM.
pub fn expected_errno_without_sentinel() -> i32 {
    if kernel_features().set_retval {
        libc::EADDRINUSE
    } else {
        libc::EPERM
    }
}

/// Prints why a test does not run on this machine (`PG-SKIP: <reason>`); the test returns right
/// after. `cargo xtask vm-test` reports the test as skipped, with the reason.
pub fn skip(reason: &str) {
    println!("PG-SKIP: {reason}");
}

/// Prints why a part of a test does not run on this machine while the rest does
/// (`PG-SKIP-PART: <reason>`). `cargo xtask vm-test` reports the test as passed, with the note.
pub fn skip_part(reason: &str) {
    println!("PG-SKIP-PART: {reason}");
}

/// What ephemeral-port protection adds to net.ipv4.ip_local_reserved_ports ahead of ranges
/// above 49151 under a config that names no sentinel port: `"49151,"` where refusals go through
/// the sentinel (it is protected with the ranges), else nothing.
pub fn default_sentinel_reserved() -> &'static str {
    if kernel_features().sentinel {
        "49151,"
    } else {
        ""
    }
}
