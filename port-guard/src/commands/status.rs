//! `port-guard status`: the guard as the kernel holds it, the daemon as it recorded itself, and
//! whether the config file on disk is the one in force.
//!
//! Exit status (documented in the man page): 0 when the guard is attached, a daemon runs, its
//! last reload (if any) succeeded and the config on disk is the one in force; 3 when the guard is
//! loaded but its links are not attached (binds are not checked); 4 when it is attached but no
//! daemon runs (ended VMs' leases are not reaped and allowed cgroups that appear are not
//! allowed); 5 when the daemon's last reload was refused (the previous config is in force); 6
//! when the config on disk is not the one in force (edited and not reloaded, or a reload would
//! be refused); 1 when no guard is loaded or status cannot be read.
//!
//! `--prometheus` prints the guard's state as metrics instead, from the pins alone (and the
//! daemon's last counts), for a textfile collector while no daemon runs.

use std::process::ExitCode;

use anyhow::Result;

use crate::{
    cgroup::Cgroup2,
    leases::now_secs,
    maps::Maps,
    pin::PinDir,
    status::{self, Recorded, Status},
};

/// Status exit codes, most serious first.
pub const EXIT_NOT_ATTACHED: u8 = 3;
pub const EXIT_NO_DAEMON: u8 = 4;
pub const EXIT_RELOAD_FAILED: u8 = 5;
pub const EXIT_CONFIG_DRIFT: u8 = 6;

/// What `status` prints.
pub enum Output {
    Table,
    Json,
    /// Metrics, to stdout or into a file.
    Prometheus(Option<std::path::PathBuf>),
}

impl Output {
    pub fn of(json: bool, prometheus: bool, textfile: Option<std::path::PathBuf>) -> Output {
        match (json, prometheus) {
            (_, true) => Output::Prometheus(textfile),
            (true, false) => Output::Json,
            _ => Output::Table,
        }
    }
}

/// Reads the guard's maps and the agent's files about it once, and shows what they say; the exit
/// status says how the guard stands (the metrics' only that they were read).
pub fn run(pin: &PinDir, config: Option<&std::path::Path>, out: Output) -> Result<ExitCode> {
    let cg = Cgroup2::find()?;
    let maps = Maps::open(pin)?;
    let recorded = Recorded::read(pin);
    let mut s = status::status_of(pin, &cg, &maps, &recorded)?;
    s.config_drift = status::config_drift(recorded.daemon(), config, &s);
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Table => print!("{}", render(&s)),
        Output::Prometheus(file) => {
            prometheus(pin, &maps, &s, file)?;
            // Metrics are for a collector: their exit status says only whether they were read.
            return Ok(ExitCode::SUCCESS);
        }
    }
    Ok(ExitCode::from(exit_code(&s)))
}

/// The guard's state as metrics, on stdout or into `file`.
fn prometheus(
    pin: &PinDir,
    maps: &Maps,
    s: &Status,
    file: Option<std::path::PathBuf>,
) -> Result<()> {
    let last = crate::state::load_stats(pin.path());
    // A running daemon's last counts (written every few seconds) are its own: its gauges
    // (ephemeral protection) hold as the endpoint's do.
    let first = crate::metrics::DaemonStats::default();
    let running = s.daemon.running.then(|| last.as_ref().unwrap_or(&first));
    let text = crate::metrics::render(maps, s.attached, running, last.as_ref())?;
    match file {
        Some(path) => {
            crate::metrics::textfile::check_path(&path).map_err(anyhow::Error::msg)?;
            crate::metrics::textfile::write(&path, &text)
                .map_err(|e| anyhow::anyhow!("writing the metrics to {}: {e}", path.display()))?;
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// The exit status `s` calls for.
pub fn exit_code(s: &Status) -> u8 {
    if !s.attached {
        EXIT_NOT_ATTACHED
    } else if !s.daemon.running {
        EXIT_NO_DAEMON
    } else if s.daemon.last_reload.as_ref().is_some_and(|r| !r.ok) {
        EXIT_RELOAD_FAILED
    } else if s.config_drift.is_some() {
        EXIT_CONFIG_DRIFT
    } else {
        0
    }
}

/// The daemon's line(s) for the table.
fn daemon(s: &Status) -> String {
    let d = &s.daemon;
    let now = now_secs();
    let ago = |t: u64| format!("{} ago", age(now.saturating_sub(t)));
    let mut out = if d.running {
        format!(
            "running (pid {}, up {}, config {}{})",
            d.pid.unwrap_or(0),
            age(now.saturating_sub(d.started.unwrap_or(now))),
            d.config
                .as_deref()
                .map_or("none: defaults and flags".into(), |p| p
                    .display()
                    .to_string()),
            if d.overrides.is_empty() {
                String::new()
            } else {
                format!("; overridden by {}", d.overrides.join(", "))
            }
        )
    } else {
        let last = match (d.recorded, d.stopped) {
            (false, _) => "no daemon ran on this pin dir since boot".to_owned(),
            (true, Some(t)) => format!("pid {} stopped {}", d.pid.unwrap_or(0), ago(t)),
            (true, None) => format!("pid {} ended without stopping cleanly", d.pid.unwrap_or(0)),
        };
        format!("NOT RUNNING ({last}): ended VMs' leases are not reaped and allowed cgroups that appear are not allowed until it starts")
    };
    if let Some(e) = &d.error {
        out += &format!("\n  ! cannot read the daemon's record: {e}");
    }
    if let (true, Some(r)) = (d.running, &d.last_reload) {
        out += &if r.ok {
            format!("\n           last reload {}: ok", ago(r.at))
        } else {
            format!(
                "\n           last reload {}: REFUSED, the previous config stays in force: {}",
                ago(r.at),
                r.error.as_deref().unwrap_or("?")
            )
        };
    }
    out
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Where the guard enforces, for the table.
fn netns(s: &Status) -> String {
    if !s.netns.scoped {
        return "all (every network namespace)".into();
    }
    if s.netns.guarded.is_empty() {
        return "none present yet (binds are checked nowhere)".into();
    }
    s.netns
        .guarded
        .iter()
        .map(|n| format!("{} (inode {})", n.name, n.inode))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human table: the guard's settings, its ranges, the shares of the limited ones, the
/// leases.
pub fn render(s: &Status) -> String {
    let mut out = header(s);
    out += &ranges(s);
    out += &shares(s);
    out += &leases(s);
    out
}

/// What refused binds get, in words.
fn errno_line(s: &Status) -> String {
    match &s.sentinel {
        Some(st) if s.errno == "eaddrinuse" && !st.held_in.is_empty() => format!(
            "eaddrinuse (through the sentinel port {}; eperm in other namespaces)",
            st.ports
                .iter()
                .map(|p| format!("{} in {}", p.port, p.netns))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(_) if s.errno == "eaddrinuse" && !s.kernel_sets_errno => {
            "eaddrinuse wanted, eperm given: no sentinel holds its port now (is the daemon running?)"
                .to_owned()
        }
        _ if s.errno == s.effective_errno => s.errno.to_owned(),
        _ => format!("{} (this kernel gives {})", s.errno, s.effective_errno),
    }
}

fn header(s: &Status) -> String {
    let mut out = format!(
        "guard:     {}\ndaemon:    {}\npin dir:   {}\nattach:    {}\nnetns:     {}\nmode:      {}\nerrno:     {}\nephemeral: {}\nspawn:     {}\n",
        if s.attached { "attached" } else { "NOT ATTACHED: binds are not checked" },
        daemon(s),
        s.pin_dir.display(),
        s.attach,
        netns(s),
        s.mode,
        errno_line(s),
        if s.protect_ephemeral { "protected" } else { "not protected" },
        if s.spawn_parent.is_empty() { "-" } else { &s.spawn_parent },
    );
    if let Some(d) = &s.config_drift {
        out += &format!("config:    NOT IN FORCE: {d}\n");
    }
    for d in &s.disagreements {
        out += &format!("  ! {d}\n");
    }
    out
}

/// A range's allowed cgroups as configured, with each one's state; else (no record) what the
/// guard allows.
fn allowed(r: &crate::status::RangeStatus) -> String {
    if !r.allow_configured.is_empty() {
        r.allow_configured
            .iter()
            .map(|a| {
                if a.state == "allowed" {
                    a.path.clone()
                } else {
                    format!("{} ({})", a.path, a.state.to_uppercase())
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    } else if r.allow.is_empty() {
        "- (none: only leases may bind)".to_owned()
    } else {
        r.allow.join(", ")
    }
}

fn ranges(s: &Status) -> String {
    let mut out = format!(
        "\n{:<13} {:<8} {:>8} {:>8} {:>8} {:>8}  {}\n",
        "RANGE", "PROTO", "ALLOWED", "DENIED", "AUDITED", "SINCE", "ALLOWED CGROUPS"
    );
    let now = now_secs();
    for r in &s.reserve {
        out += &format!(
            "{:<13} {:<8} {:>8} {:>8} {:>8} {:>8}  {}\n",
            r.ports,
            r.protocols.join("+"),
            r.counters.allowed,
            r.counters.denied,
            r.counters.audited,
            r.counters_since
                .map_or("?".to_owned(), |t| age(now.saturating_sub(t))),
            allowed(r),
        );
    }
    if s.netns.unguarded_binds > 0 {
        out += &format!(
            "({} binds of reserved ports in network namespaces the guard does not enforce in, let through)\n",
            s.netns.unguarded_binds
        );
    }
    if s.events_lost > 0 {
        out += &format!(
            "({} denials were not reported: the event ring buffer was full)\n",
            s.events_lost
        );
    }
    out
}

/// Per limited range: the units holding its ports, busiest first.
fn shares(s: &Status) -> String {
    let limited: Vec<_> = s
        .reserve
        .iter()
        .filter(|r| r.per_child_limit != 0)
        .collect();
    if limited.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n{:<13} {:>5} {:>7} {:>8}  {}\n",
        "SHARES", "LIMIT", "HELD", "REFUSED", "UNIT"
    );
    for r in limited {
        let refused = if s.mode == "audit" {
            "-".to_owned()
        } else {
            r.counters.limited.to_string()
        };
        if r.shares.is_empty() {
            out += &format!(
                "{:<13} {:>5} {:>7} {:>8}  (no unit holds a port)\n",
                r.ports, r.per_child_limit, 0, refused
            );
        }
        for (i, sh) in r.shares.iter().enumerate() {
            let at_limit = if sh.held >= u64::from(sh.limit) {
                "  (AT ITS LIMIT)"
            } else {
                ""
            };
            out += &format!(
                "{:<13} {:>5} {:>7} {:>8}  {}{at_limit}\n",
                if i == 0 { r.ports.as_str() } else { "" },
                r.per_child_limit,
                sh.held,
                if i == 0 { refused.as_str() } else { "" },
                sh.unit,
            );
        }
    }
    out
}

fn leases(s: &Status) -> String {
    let mut out = format!(
        "\n{:<24} {:>8} {:>8}  {:<22} {}\n",
        "LEASED PORTS", "AGE", "TTL LEFT", "ENDS ON", "CGROUP"
    );
    if s.lessees.is_empty() {
        out += "(none)\n";
    }
    for g in &s.lessees {
        let ports = g
            .ports
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let ends = match (g.until_empty, g.expires_in_secs.is_some()) {
            (true, true) => "release/rmdir/empty/TTL",
            (true, false) => "release/rmdir/empty",
            (false, true) => "release/rmdir/TTL",
            (false, false) => "release/rmdir",
        };
        let unranged: Vec<String> = s
            .leases
            .iter()
            .filter(|l| l.cgroup == g.cgroup && !l.in_range)
            .map(|l| l.port.to_string())
            .collect();
        out += &format!(
            "{:<24} {:>8} {:>8}  {:<22} {}{}\n",
            ports,
            age(g.age_secs),
            g.expires_in_secs.map_or("-".to_owned(), age),
            ends,
            g.cgroup,
            if unranged.is_empty() {
                String::new()
            } else {
                format!(
                    "  (NO RANGE COVERS {}: not enforced; `port-guard release --port` ends it)",
                    unranged.join(" ")
                )
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(65), "1m05s");
        assert_eq!(age(7260), "2h01m");
        assert_eq!(age(90000), "1d01h");
    }
}
