//! `port-guard check`: can this host run the guard, and who already holds reserved ports.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Result;
use serde::Serialize;

use crate::{
    cgroup::Cgroup2,
    config::{build_policy, check_cgroups, ConfigFile},
    conflicts::{self, View},
    maps::Maps,
    pin::PinDir,
    policy::{NetnsScope, Policy},
    probe,
    sockets::Scan,
    state::DaemonRecord,
    status::{status_of, Recorded, Status},
};

#[derive(Serialize)]
struct Item {
    name: &'static str,
    ok: bool,
    /// Passes, but weakens the guard.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    warning: bool,
    detail: String,
}

#[derive(Serialize)]
struct Report {
    kernel: String,
    preflight: Vec<Item>,
    features: Features,
    /// One line per fallback the guard takes on this kernel.
    fallbacks: Vec<String>,
    /// The config file checked (None: no file, the defaults).
    config: Option<PathBuf>,
    /// What that config would change against the loaded guard (None: no guard is loaded).
    changes: Option<Vec<String>>,
    /// Where the reserved ranges came from: "config" (with --config, or when no guard is
    /// loaded) or "pins" (the loaded guard).
    policy_source: &'static str,
    socket_source: &'static str,
    bound_inactive_visible: bool,
    sockets: Vec<conflicts::Holder>,
    conflicts: usize,
    ok: bool,
}

#[derive(Serialize)]
struct Features {
    set_retval: bool,
    netns_cookie: bool,
    /// EADDRINUSE is given through the sentinel port.
    sentinel: bool,
}

/// What `check` reads of a loaded guard, once: its maps, the agent's files (the daemon's record
/// among them), its status.
struct Loaded {
    maps: Option<Maps>,
    recorded: Recorded,
    status: Option<Status>,
}

impl Loaded {
    fn read(pin: &PinDir, cg: Option<&Cgroup2>) -> Loaded {
        let maps = pin.exists().then(|| Maps::open(pin).ok()).flatten();
        let recorded = Recorded::read(pin);
        let status = match (&maps, cg) {
            (Some(m), Some(c)) => status_of(pin, c, m, &recorded).ok(),
            _ => None,
        };
        Loaded {
            maps,
            recorded,
            status,
        }
    }
}

/// The config `check` judges: the file (`--config`, else the default one) merged with the
/// daemon's command-line flags as it last started, as its reload would merge them.
struct Judged {
    policy: Policy,
    /// The file (None: no file, the defaults).
    path: Option<PathBuf>,
    /// The daemon's flags that override a key of the file.
    overriding: Vec<String>,
}

impl Judged {
    fn load(config: Option<&Path>, record: Option<&DaemonRecord>) -> Result<Judged> {
        let (file, path) = ConfigFile::load(config)?;
        let flags = record.map(|r| r.flags.clone()).unwrap_or_default();
        let policy = build_policy(&file, path.as_deref(), &flags)?;
        Ok(Judged {
            policy,
            overriding: flags.overriding(&file),
            path,
        })
    }

    /// The file, or the defaults, as the config items name it.
    fn named(&self) -> String {
        self.path
            .as_deref()
            .map_or("the defaults (no config file)".to_owned(), |p| {
                p.display().to_string()
            })
    }
}

/// The checks so far.
#[derive(Default)]
struct Preflight(Vec<Item>);

impl Preflight {
    fn push(&mut self, name: &'static str, ok: bool, warning: bool, detail: String) {
        self.0.push(Item {
            name,
            ok,
            warning,
            detail,
        });
    }

    fn warn(&mut self, name: &'static str, detail: String) {
        self.push(name, true, true, detail);
    }

    /// The kernel loads the programs: its features, or a FAIL.
    fn bpf(&mut self) -> Option<probe::Features> {
        probe::raise_memlock();
        match probe::probe() {
            Ok(f) => {
                self.push("bpf", true, false, "cgroup bind programs load".into());
                Some(f)
            }
            Err(e) => {
                self.push("bpf", false, false, format!("{:#}", anyhow::Error::new(e)));
                None
            }
        }
    }

    fn cgroup2(&mut self) -> Option<Cgroup2> {
        match Cgroup2::find() {
            Ok(c) => {
                self.push(
                    "cgroup2",
                    true,
                    false,
                    format!("mounted at {}", c.mount().display()),
                );
                Some(c)
            }
            Err(e) => {
                self.push("cgroup2", false, false, e.to_string());
                None
            }
        }
    }

    fn filesystems(&mut self, pin: &PinDir) {
        let (ok, detail) = crate::pin::bpffs_state(pin);
        self.push("bpffs", ok, false, detail);
        let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
        self.push(
            "btf",
            true,
            false,
            if btf {
                "present (not required)".into()
            } else {
                "absent (not required: the programs use no CO-RE)".into()
            },
        );
    }

    /// The config as the daemon would merge it (with its recorded flags): its warnings.
    fn config(
        &mut self,
        policy: &Policy,
        named: &str,
        overriding: &[String],
        cg: Option<&Cgroup2>,
    ) {
        if !overriding.is_empty() {
            self.warn(
                "config",
                format!(
                    "the daemon's command-line flags override the file: {} (a reload keeps them)",
                    overriding.join(", ")
                ),
            );
        }
        if let Some(c) = cg {
            match check_cgroups(policy, c) {
                Ok(missing) => {
                    for m in missing {
                        self.warn("config", format!("{named}: allowed cgroup {m} does not exist yet (allowed as soon as it appears; check its spelling)"));
                    }
                }
                Err(e) => self.push("config", false, false, format!("{named}: {e}")),
            }
        }
        if policy.reserve.iter().all(|r| r.allow.is_empty()) {
            self.warn("config", format!("{named}: no range allows any cgroup: only leases (spawn, lease) may bind the reserved ports; on a libvirt host its migrations would be refused"));
        }
        if !policy.protect_ephemeral {
            self.warn("ephemeral", "protect_ephemeral = false: a process the guard refuses can still get a reserved port the kernel picks for it (connect(), sendto(), bind() to port 0)".into());
        }
    }

    /// What a reload of `policy` would change against the loaded guard, and refuse.
    fn plan(&mut self, policy: &Policy, status: Option<&Status>) -> Option<Vec<String>> {
        let p = crate::plan::plan(policy, status?);
        for problem in p.problems {
            self.push("reload", !problem.fatal, !problem.fatal, problem.detail);
        }
        Some(p.changes)
    }

    /// The errno the kernel can give, and what it falls back to.
    fn errno(&mut self, features: Option<probe::Features>, policy: &Policy) -> Vec<String> {
        let Some(f) = features else {
            return Vec::new();
        };
        if let Err(e) = f.check(policy) {
            self.push("errno", false, false, e.0);
        }
        f.fallbacks()
    }

    /// Who holds the sentinel port, where refusals go through it.
    fn sentinel(
        &mut self,
        features: Option<probe::Features>,
        policy: &Policy,
        maps: Option<&Maps>,
    ) {
        if let Some(f) = features.filter(|f| f.uses_sentinel(policy)) {
            self.0.push(sentinel_item(f, policy.sentinel_port, maps));
        }
    }

    /// The sockets on the reserved ports of `view` in the guarded namespaces; what the scan
    /// could not see, as items.
    fn sockets(&mut self, view: &View, netns: &NetnsScope) -> (Scan, Vec<conflicts::Holder>) {
        let (scan, holders, netns_notes) = conflicts::find_in(view, netns);
        for note in netns_notes {
            self.warn("netns", note);
        }
        if !scan.bound_inactive_visible {
            self.push("sockets", true, false, format!("read from {}: TCP sockets bound but not listening are not visible on this kernel (needs sock_diag, 6.8+)", scan.source));
        }
        (scan, holders)
    }
}

/// Exit status: 0 when the preflight passes and nothing conflicts, 1 otherwise.
pub fn run(pin: &PinDir, config: Option<&Path>, json: bool) -> Result<ExitCode> {
    let (report, view) = check(pin, config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, &view));
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The checks in their order: the kernel and filesystems, the config as the daemon would take
/// it, then the sockets already on reserved ports. The loaded guard (its maps, its daemon's
/// record and its status) is read once, and what was read is passed down.
fn check(pin: &PinDir, config: Option<&Path>) -> Result<(Report, View)> {
    let mut preflight = Preflight::default();
    let features = preflight.bpf();
    let cg = preflight.cgroup2();
    preflight.filesystems(pin);
    let loaded = Loaded::read(pin, cg.as_ref());
    let judged = Judged::load(config, loaded.recorded.daemon())?;
    let policy = &judged.policy;
    preflight.config(policy, &judged.named(), &judged.overriding, cg.as_ref());
    let changes = preflight.plan(policy, loaded.status.as_ref());
    preflight.sentinel(features, policy, loaded.maps.as_ref());
    let fallbacks = preflight.errno(features, policy);
    // The file's ranges when one is named; else the loaded guard's, if any.
    let view = match (&cg, &loaded.maps) {
        (Some(c), Some(m)) if config.is_none() => View::from_maps(m, c).ok(),
        _ => None,
    }
    .unwrap_or_else(|| View::from_policy(policy));
    let (scan, holders) = preflight.sockets(&view, &policy.netns);
    let conflicts = holders.iter().filter(|h| h.would_refuse).count();
    let ok = preflight.0.iter().all(|i| i.ok) && conflicts == 0;
    let report = Report {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        preflight: preflight.0,
        features: Features {
            set_retval: features.is_some_and(|f| f.set_retval),
            netns_cookie: features.is_some_and(|f| f.netns_cookie),
            sentinel: features.is_some_and(|f| f.uses_sentinel(policy)),
        },
        fallbacks,
        config: judged.path,
        changes,
        policy_source: view.source,
        socket_source: scan.source,
        bound_inactive_visible: scan.bound_inactive_visible,
        sockets: holders,
        conflicts,
        ok,
    };
    Ok((report, view))
}

/// The table: the preflight, what the config would change, the sockets, the verdict.
fn render(r: &Report, view: &View) -> String {
    let mut out = format!("kernel {}\n", r.kernel);
    out += &preflight_lines(r);
    out += &changes_lines(r);
    out += &sockets_table(r, view);
    out += &format!(
        "\n{}\n",
        if r.ok {
            "check passed".to_owned()
        } else {
            let failed = r.preflight.iter().filter(|i| !i.ok).count();
            format!(
                "check failed: {failed} failed item(s), {} conflict(s)",
                r.conflicts
            )
        }
    );
    out
}

/// One line per item (ok, WARN or FAIL), then the fallbacks this kernel takes.
fn preflight_lines(r: &Report) -> String {
    let mut out = String::new();
    for i in &r.preflight {
        out += &format!(
            "{:<5} {:<8} {}\n",
            match (i.ok, i.warning) {
                (false, _) => "FAIL",
                (true, true) => "WARN",
                (true, false) => "ok",
            },
            i.name,
            i.detail
        );
    }
    for f in &r.fallbacks {
        out += &format!("{:<5} {:<8} {}\n", "note", "fallback", f);
    }
    out
}

/// What the config would change against the loaded guard (nothing when none is loaded).
fn changes_lines(r: &Report) -> String {
    match &r.changes {
        None => String::new(),
        Some(c) if c.is_empty() => "\nagainst the loaded guard: no change\n".to_owned(),
        Some(c) => {
            let mut out = format!(
                "\nagainst the loaded guard, {} would change:\n",
                r.config
                    .as_deref()
                    .map_or("the defaults".to_owned(), |p| p.display().to_string())
            );
            for line in c {
                out += &format!("  {line}\n");
            }
            out
        }
    }
}

/// The sockets on reserved ports, one row each with what the guard would do to it.
fn sockets_table(r: &Report, view: &View) -> String {
    let ranges: Vec<String> = view.ranges.iter().map(|(s, _)| s.to_string()).collect();
    let mut out = format!(
        "\nsockets on reserved ports ({}; ranges from {}):\n",
        ranges.join(" "),
        r.policy_source
    );
    if r.sockets.is_empty() {
        out += "(none)\n";
        return out;
    }
    out += &format!(
        "{:<6} {:<5} {:<5} {:<12} {:>7} {:<16} {:<40} {:<12} {}\n",
        "PORT", "PROTO", "FAM", "STATE", "PID", "COMMAND", "CGROUP", "NETNS", "GUARD"
    );
    for h in &r.sockets {
        out += &format!(
            "{:<6} {:<5} {:<5} {:<12} {:>7} {:<16} {:<40} {:<12} {}\n",
            h.port,
            h.protocol,
            h.family.trim_start_matches("ip"),
            h.state,
            h.pid.map(|p| p.to_string()).unwrap_or("?".into()),
            shown(h.command.as_deref()),
            shown(h.cgroup.as_deref()),
            shown(Some(&h.netns)),
            guard_column(h),
        );
    }
    out
}

/// What the guard would do to a socket's holder, and why.
fn guard_column(h: &conflicts::Holder) -> String {
    if h.would_refuse {
        format!("CONFLICT: would refuse ({})", escaped(&h.reason))
    } else {
        match &h.unit {
            Some(u) => format!("ok ({}; unit {})", escaped(&h.reason), shown(Some(u))),
            None => format!("ok ({})", escaped(&h.reason)),
        }
    }
}

/// A value a process chose (its comm, its cgroup's name), for the table: quoted and escaped as
/// the log lines do, so that no terminal escape or field can be forged.
fn shown(v: Option<&str>) -> String {
    v.map_or("?".into(), |v| crate::logfmt::value(v).into_owned())
}

/// A sentence that may hold such values: control characters escaped.
fn escaped(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Who holds the sentinel port in this netns. Sentinels are told by their socket cookies
/// (`PG_SENTINELS` of the loaded guard), never by a process name anyone can choose. Someone
/// else on the port: the daemon takes the nearest free port below it instead (where a guard is
/// loaded, its sentinel may already have).
fn sentinel_item(f: probe::Features, port: u16, maps: Option<&Maps>) -> Item {
    let ours = maps.map(|m| m.sentinel_cookies()).unwrap_or_default();
    let taken_instead = maps
        .and_then(|m| m.sentinel_netns_ports().ok())
        .unwrap_or_default();
    let scan = crate::sockets::scan(|p, _| p == port);
    let others = held_by_others(&scan, &ours);
    let how = if f.set_retval {
        "forced with PORT_GUARD_SENTINEL=force"
    } else {
        "this kernel cannot set their errno"
    };
    let instead: Vec<String> = taken_instead
        .iter()
        .filter(|p| **p != port)
        .map(u16::to_string)
        .collect();
    if !others.is_empty() {
        return Item {
            name: "sentinel",
            ok: true,
            warning: true,
            detail: format!(
                "the sentinel port {port} is held by {}: {} (refused binds still get EADDRINUSE)",
                others.join(", "),
                if instead.is_empty() {
                    "the daemon's sentinel takes the nearest free port below it".to_owned()
                } else {
                    format!(
                        "the daemon's sentinel holds port {} in its place",
                        instead.join(", ")
                    )
                }
            ),
        };
    }
    Item {
        name: "sentinel",
        ok: true,
        warning: false,
        detail: if !instead.is_empty() && scan.sockets.is_empty() {
            format!(
                "port {port} is free; the daemon's sentinel holds port {} in its place (taken while {port} was held): refused binds get EADDRINUSE",
                instead.join(", ")
            )
        } else if scan.sockets.is_empty() {
            format!(
                "port {port} is free: the daemon holds it to give refused binds EADDRINUSE ({how})"
            )
        } else {
            format!("port {port} is held by the daemon's sentinel (its socket cookies are the guard's): refused binds get EADDRINUSE")
        },
    }
}

/// The sockets of `scan` that are not the guard's sentinels (by their cookies), each as
/// `PORT/PROTOCOL by pid N (COMMAND)`, or `(owner unknown)`.
fn held_by_others(scan: &Scan, ours: &std::collections::HashSet<u64>) -> Vec<String> {
    scan.sockets
        .iter()
        .filter(|s| !ours.contains(&s.cookie))
        .flat_map(|s| {
            if s.owners.is_empty() {
                return vec![format!("{}/{} (owner unknown)", s.port, s.protocol)];
            }
            s.owners
                .iter()
                .map(|o| {
                    format!(
                        "{}/{} by pid {} ({})",
                        s.port,
                        s.protocol,
                        o.pid,
                        shown(Some(&o.command))
                    )
                })
                .collect()
        })
        .collect()
}
