//! `port-guard check`: can this host run the guard, and who already holds reserved ports.

use std::{path::Path, process::ExitCode};

use anyhow::Result;
use serde::Serialize;

use crate::{
    cgroup::Cgroup2,
    config::{build_policy, check_cgroups, ConfigFile},
    conflicts::{self, View},
    pin::PinDir,
    probe,
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
    config: Option<std::path::PathBuf>,
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

/// Exit status: 0 when the preflight passes and nothing conflicts, 1 otherwise.
pub fn run(pin: &PinDir, config: Option<&Path>, json: bool) -> Result<ExitCode> {
    let mut preflight = Vec::new();
    probe::raise_memlock();
    let features = match probe::probe() {
        Ok(f) => {
            preflight.push(Item {
                name: "bpf",
                ok: true,
                warning: false,
                detail: "cgroup bind programs load".into(),
            });
            Some(f)
        }
        Err(e) => {
            preflight.push(Item {
                name: "bpf",
                ok: false,
                warning: false,
                detail: format!("{:#}", anyhow::Error::new(e)),
            });
            None
        }
    };
    let cg = Cgroup2::find();
    preflight.push(match &cg {
        Ok(c) => Item {
            name: "cgroup2",
            ok: true,
            warning: false,
            detail: format!("mounted at {}", c.mount().display()),
        },
        Err(e) => Item {
            name: "cgroup2",
            ok: false,
            warning: false,
            detail: e.to_string(),
        },
    });
    let bpffs = crate::pin::bpffs_state(pin);
    preflight.push(Item {
        name: "bpffs",
        ok: bpffs.0,
        warning: false,
        detail: bpffs.1,
    });
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    preflight.push(Item {
        name: "btf",
        ok: true,
        warning: false,
        detail: if btf {
            "present (not required)".into()
        } else {
            "absent (not required: the programs use no CO-RE)".into()
        },
    });
    let (file, path) = ConfigFile::load(config)?;
    // Merged with the daemon's command-line flags (as it last started), as its reload would.
    let record = crate::state::DaemonRecord::load(pin.path()).ok().flatten();
    let flags = record.as_ref().map(|r| r.flags.clone()).unwrap_or_default();
    let policy = build_policy(&file, path.as_deref(), &flags)?;
    let overriding = flags.overriding(&file);
    if !overriding.is_empty() {
        preflight.push(Item {
            name: "config",
            ok: true,
            warning: true,
            detail: format!(
                "the daemon's command-line flags override the file: {} (a reload keeps them)",
                overriding.join(", ")
            ),
        });
    }
    let named = path
        .as_deref()
        .map_or("the defaults (no config file)".to_owned(), |p| {
            p.display().to_string()
        });
    if let Ok(c) = &cg {
        match check_cgroups(&policy, c) {
            Ok(missing) => {
                for m in missing {
                    preflight.push(Item {
                        name: "config",
                        ok: true,
                        warning: true,
                        detail: format!("{named}: allowed cgroup {m} does not exist yet (allowed as soon as it appears; check its spelling)"),
                    });
                }
            }
            Err(e) => preflight.push(Item {
                name: "config",
                ok: false,
                warning: false,
                detail: format!("{named}: {e}"),
            }),
        }
    }
    if policy.reserve.iter().all(|r| r.allow.is_empty()) {
        preflight.push(Item {
            name: "config",
            ok: true,
            warning: true,
            detail: format!("{named}: no range allows any cgroup: only leases (spawn, lease) may bind the reserved ports; on a libvirt host its migrations would be refused"),
        });
    }
    // Against the loaded guard: what a reload would change, and what it would refuse.
    let loaded = cg
        .as_ref()
        .ok()
        .filter(|_| pin.exists())
        .and_then(|c| crate::status::status(pin, c).ok());
    let changes = loaded.as_ref().map(|s| {
        let p = crate::plan::plan(&policy, s);
        for problem in p.problems {
            preflight.push(Item {
                name: "reload",
                ok: !problem.fatal,
                warning: !problem.fatal,
                detail: problem.detail,
            });
        }
        p.changes
    });
    if !policy.protect_ephemeral {
        preflight.push(Item {
            name: "ephemeral",
            ok: true,
            warning: true,
            detail: "protect_ephemeral = false: a process the guard refuses can still get a reserved port the kernel picks for it (connect(), sendto(), bind() to port 0)".into(),
        });
    }
    if let Some(f) = features.filter(|f| f.uses_sentinel(&policy)) {
        preflight.push(sentinel_item(f, policy.sentinel_port));
    }
    let fallbacks = match features {
        Some(f) => {
            if let Err(e) = f.check(&policy) {
                preflight.push(Item {
                    name: "errno",
                    ok: false,
                    warning: false,
                    detail: e.0,
                });
            }
            f.fallbacks()
        }
        None => Vec::new(),
    };
    // The file's ranges when one is named; else the loaded guard's, if any.
    let view = cg
        .as_ref()
        .ok()
        .filter(|_| config.is_none())
        .and_then(|c| View::from_pins(pin, c))
        .unwrap_or_else(|| View::from_policy(&policy));
    let (scan, holders, netns_notes) = conflicts::find_in(&view, &policy.netns);
    for note in netns_notes {
        preflight.push(Item {
            name: "netns",
            ok: true,
            warning: true,
            detail: note,
        });
    }
    if !scan.bound_inactive_visible {
        preflight.push(Item {
            name: "sockets",
            ok: true,
            warning: false,
            detail: format!("read from {}: TCP sockets bound but not listening are not visible on this kernel (needs sock_diag, 6.8+)", scan.source),
        });
    }
    let conflicts = holders.iter().filter(|h| h.would_refuse).count();
    let ok = preflight.iter().all(|i| i.ok) && conflicts == 0;
    let report = Report {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        preflight,
        features: Features {
            set_retval: features.is_some_and(|f| f.set_retval),
            netns_cookie: features.is_some_and(|f| f.netns_cookie),
            sentinel: features.is_some_and(|f| f.uses_sentinel(&policy)),
        },
        fallbacks,
        config: path,
        changes,
        policy_source: view.source,
        socket_source: scan.source,
        bound_inactive_visible: scan.bound_inactive_visible,
        sockets: holders,
        conflicts,
        ok,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, &view));
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn render(r: &Report, view: &View) -> String {
    let mut out = format!("kernel {}\n", r.kernel);
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
    match &r.changes {
        None => {}
        Some(c) if c.is_empty() => {
            out += "\nagainst the loaded guard: no change\n";
        }
        Some(c) => {
            out += &format!(
                "\nagainst the loaded guard, {} would change:\n",
                r.config
                    .as_deref()
                    .map_or("the defaults".to_owned(), |p| p.display().to_string())
            );
            for line in c {
                out += &format!("  {line}\n");
            }
        }
    }
    let ranges: Vec<String> = view.ranges.iter().map(|(s, _)| s.to_string()).collect();
    out += &format!(
        "\nsockets on reserved ports ({}; ranges from {}):\n",
        ranges.join(" "),
        r.policy_source
    );
    if r.sockets.is_empty() {
        out += "(none)\n";
    } else {
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
                h.command.as_deref().unwrap_or("?"),
                h.cgroup.as_deref().unwrap_or("?"),
                h.netns,
                if h.would_refuse {
                    format!("CONFLICT: would refuse ({})", h.reason)
                } else {
                    format!("ok ({})", h.reason)
                },
            );
        }
    }
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

/// Who holds the sentinel port in this netns: the daemon (its sentinel), nobody (the daemon
/// takes it when it starts), or someone else (refused binds here get EPERM while they do).
fn sentinel_item(f: probe::Features, port: u16) -> Item {
    let scan = crate::sockets::scan(|p, _| p == port);
    let others: Vec<String> = scan
        .sockets
        .iter()
        .flat_map(|s| s.owners.iter().map(move |o| (s, o)))
        // The daemon's sentinel, or its sockets kept in the service manager's fd store.
        .filter(|(_, o)| o.command != "port-guard" && o.pid != 1)
        .map(|(s, o)| format!("{}/{} by pid {} ({})", s.port, s.protocol, o.pid, o.command))
        .collect();
    if !others.is_empty() {
        return Item {
            name: "sentinel",
            ok: true,
            warning: true,
            detail: format!(
                "the sentinel port {port} is held by {}: the daemon cannot hold it, and refused binds here get EPERM instead of EADDRINUSE until it can (choose another sentinel_port, or stop that process)",
                others.join(", ")
            ),
        };
    }
    Item {
        name: "sentinel",
        ok: true,
        warning: false,
        detail: if scan.sockets.is_empty() {
            format!(
                "port {port} is free: the daemon holds it to give refused binds EADDRINUSE ({})",
                if f.set_retval {
                    "forced with PORT_GUARD_SENTINEL=force"
                } else {
                    "this kernel cannot set their errno"
                }
            )
        } else {
            format!("port {port} is held by the daemon's sentinel (or the service manager keeps it between two daemons): refused binds get EADDRINUSE")
        },
    }
}
