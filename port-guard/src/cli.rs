//! The command line. Doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::pin::DEFAULT_PIN_DIR;

/// Keeps reserved ports (libvirt's migration range) away from every process that is not meant to
/// have them, with a cgroup bind4/bind6 eBPF guard, and hands out per-port leases.
#[derive(Debug, Parser)]
#[command(name = "port-guard", version)]
pub struct Cli {
    /// Where the guard's maps and links are pinned (on bpffs).
    #[arg(long, global = true, env = "PORT_GUARD_PIN_DIR", default_value = DEFAULT_PIN_DIR, value_name = "DIR")]
    pub pin_dir: PathBuf,
    /// Config file (TOML). The default path may be absent (defaults apply); a named one must exist.
    #[arg(long, global = true, env = "PORT_GUARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// More log output: -v for debug, -vv for trace (and the eBPF loader's own).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the guard (or adopt it from the pins), apply the config, log denials.
    Daemon(DaemonArgs),
    /// Show the guard's ranges, allowed cgroups, shares, leases and counters (from the pins),
    /// the daemon, and whether the config file on disk is the one in force. Exit status: 0 all
    /// well; 3 not attached; 4 no daemon runs; 5 its last reload was refused; 6 the config on
    /// disk differs from the one in force; 1 nothing is loaded.
    Status {
        /// One JSON object instead of the table.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// The guard's state as Prometheus metrics (text format), from the pins alone: what a
        /// textfile collector reads while no daemon runs (the shipped timer writes it).
        #[arg(long)]
        prometheus: bool,
        /// With --prometheus: write the metrics into FILE (replaced whole) instead of stdout,
        /// e.g. /var/lib/prometheus/node-exporter/port-guard.prom.
        #[arg(long, value_name = "FILE", requires = "prometheus")]
        textfile: Option<std::path::PathBuf>,
    },
    /// Lease a free port (or --port N, or --count N ports at once) to a fresh cgroup below the
    /// spawn parent, move into it, replace {port} (the first port) and {port0}..{portN-1} in
    /// every argument, print the port(s) as the first stdout line, exec CMD. The lease ends when
    /// that cgroup empties (the VM exited).
    Spawn {
        /// Name of the cgroup to create below the spawn parent (default vm-PID).
        #[arg(long)]
        name: Option<String>,
        /// Lease this port instead of the first free one.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..), conflicts_with = "count")]
        port: Option<u16>,
        /// Lease this many ports, all or nothing (e.g. 2: the migration stream and the NBD
        /// server of a storage migration).
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        count: u16,
        /// Print one JSON object ({"port", "ports", "pid", "cgroup"}) instead of the port(s).
        #[arg(long)]
        json: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Lease a free port (or --port N, or --count N ports) to an existing cgroup and print it.
    ///
    /// The lease lasts until `port-guard release`, until CGROUP is removed, or until its --ttl
    /// runs out, whichever comes first; processes in CGROUP coming and going do not end it
    /// (--until-empty makes it end when CGROUP, once populated, has no process left). The TTL is
    /// kept in the kernel map with the lease, so it holds across daemon restarts; the daemon
    /// ends the lease within a second of it. `--renew --ttl D` restarts the TTL of CGROUP's
    /// leases (or of --port N) from now.
    Lease {
        /// The lessee: only processes in it or below may bind the port.
        #[arg(long, value_name = "CGROUP")]
        cgroup: String,
        /// Lease this port instead of the first free one (with --renew: renew only this one).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..), conflicts_with = "count")]
        port: Option<u16>,
        /// Lease this many ports, all or nothing.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        count: u16,
        /// End the lease this long from now unless renewed: 90s, 10m, 2h, 1d (1s to 365d).
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// Also end the lease when CGROUP, once populated, has no process left.
        #[arg(long, conflicts_with = "renew")]
        until_empty: bool,
        /// Restart the TTL of CGROUP's existing leases (or of --port N) from now: needs --ttl.
        #[arg(long, requires = "ttl", conflicts_with = "count")]
        renew: bool,
        /// Print one JSON object ({"port", "ports", "cgroup", "ttl_secs"}).
        #[arg(long)]
        json: bool,
    },
    /// End a lease: by port, or every lease of a cgroup.
    Release {
        /// The leased port to give back.
        #[arg(long, conflicts_with = "cgroup", required_unless_present = "cgroup")]
        port: Option<u16>,
        /// Give back every port leased to this cgroup.
        #[arg(long, value_name = "CGROUP")]
        cgroup: Option<String>,
    },
    /// Preflight (BPF, cgroup2, bpffs, kernel features and fallbacks) and every socket already
    /// holding a reserved port. Exit status 1 when something fails or conflicts.
    Check {
        /// One JSON object instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Make the running daemon reload its config (SIGHUP) and wait for the result: exit status 0
    /// when the new config is in force, 1 when it was refused (the old one stays) or no daemon
    /// answered. For ExecReload= in the unit, so that `systemctl reload` fails on a bad config.
    Reload {
        /// How long to wait for the daemon's answer, in seconds.
        #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
    },
    /// Detach the guard and remove its pins; ephemeral protection's sysctl changes are undone in
    /// every netns they were made in.
    Unload {
        /// Drop the saved sysctl change of a network namespace that no path and no process
        /// reaches any more (it cannot be restored from here: if the netns still exists, its
        /// net.ipv4.ip_local_reserved_ports keeps the reserved ports until it is changed by hand).
        #[arg(long)]
        forget_unreachable: bool,
    },
    /// Print the man page (roff) on stdout: `port-guard man > port-guard.8`.
    Man,
    /// Print a shell completion script: `port-guard completions bash > /etc/bash_completion.d/port-guard`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Cgroup to attach to (default "/": the whole host).
    #[arg(long, value_name = "CGROUP")]
    pub attach: Option<String>,
    /// A reserved range: 49152-49215, 49152-49215/tcp, 5000/udp, 6000-6010/tcp+udp. Replaces the
    /// config file's ranges; repeat for several.
    #[arg(long, value_name = "SPEC")]
    pub reserve: Vec<String>,
    /// A cgroup (and everything below it) allowed to bind unleased ports of every range.
    #[arg(long, value_name = "CGROUP")]
    pub allow: Vec<String>,
    /// enforce: refuse; audit: log what would be refused, refuse nothing.
    #[arg(long, value_name = "enforce|audit")]
    pub mode: Option<String>,
    /// What a refused bind() returns.
    #[arg(long, value_name = "eperm|eacces|eaddrinuse")]
    pub errno: Option<String>,
    /// Keep the kernel from auto-picking reserved ports (net.ipv4.ip_local_reserved_ports): the
    /// default.
    #[arg(long, overrides_with = "no_protect_ephemeral")]
    pub protect_ephemeral: bool,
    /// Let the kernel auto-pick reserved ports (connect(), sendto(), bind to port 0): a refused
    /// process can then get one without bind().
    #[arg(long, overrides_with = "protect_ephemeral")]
    pub no_protect_ephemeral: bool,
    /// Start even if this kernel cannot give refused binds the configured errno (before 6.1 they
    /// get EPERM); without it the daemon refuses to start there.
    #[arg(long)]
    pub allow_fallback: bool,
    /// A network namespace to enforce in: host (the daemon's own: the default), all, or a netns
    /// file such as /run/netns/NAME (guarded from the moment it exists). Repeat for several;
    /// replaces the config file's list.
    #[arg(long, value_name = "host|all|PATH")]
    pub netns: Vec<String>,
    /// Where the kernel cannot set a refused bind's errno (before 6.1): the port refused binds
    /// are rewritten to, which the daemon holds, so that they fail with EADDRINUSE (default
    /// 49151, or the nearest port outside the ranges; 0: none, they get EPERM).
    #[arg(long, value_name = "PORT")]
    pub sentinel_port: Option<u16>,
    /// The most sockets bound to ports of a range that one child of an allowed cgroup (one VM's
    /// scope, with everything below it) may hold at once: the next bind is refused with the
    /// configured errno until one closes. Applies to the ranges of --reserve (or the default
    /// range); the config file's ranges take `per_child_limit` in their [[reserve]] table.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub per_child_limit: Option<u32>,
    /// Parent of the cgroups `spawn` creates (default /port-guard).
    #[arg(long, value_name = "CGROUP")]
    pub spawn_parent: Option<String>,
    /// Serve Prometheus metrics (GET /metrics) on IP:PORT, e.g. 127.0.0.1:9469, or on a unix
    /// socket only root may connect to, unix:/run/port-guard/metrics.sock (config key
    /// metrics_listen).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Write the metrics into this file every 5 seconds, replacing it whole, for
    /// node_exporter's textfile collector, e.g.
    /// /var/lib/prometheus/node-exporter/port-guard.prom (config key metrics_textfile).
    #[arg(long, value_name = "FILE")]
    pub metrics_textfile: Option<std::path::PathBuf>,
    /// Unload the guard when the daemon exits (default: it keeps enforcing).
    #[arg(long)]
    pub unload_on_exit: bool,
}

/// `--ttl`: a number with s, m, h or d (plain: seconds), 1 s to 365 days; in seconds.
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let bad = || {
        format!("invalid duration {text:?}: expected a number with s, m, h or d, such as 90s, 10m, 2h or 1d")
    };
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(mult).ok_or_else(bad)?;
    if !(1..=365 * 86400).contains(&secs) {
        return Err(format!("duration {text:?} out of range: from 1s to 365d"));
    }
    Ok(secs)
}
