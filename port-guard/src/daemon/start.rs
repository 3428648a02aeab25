//! Start-up: everything that can be checked without the kernel first (the config, the metrics
//! address, the pin dir), then the probe, the pins, the guard, ephemeral protection; then the
//! [`Daemon`] serves until it is told to stop.

use std::time::Instant;

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::signal::unix::{signal, SignalKind};

use super::{netns::GuardedNetns, policy, serve, Daemon, Exit, Signals, Source};
use crate::{
    cgroup::{Cgroup2, CgroupPath},
    guard::{self, Guard},
    maps::Resolved,
    metrics,
    pin::PinDir,
    policy::NetnsScope,
    probe::{self, Features},
    state::DaemonRecord,
};

/// Starts the daemon and serves until it is told to stop.
pub fn run(
    pin: &PinDir,
    source: Source<'_>,
    metrics_listen: Option<std::net::SocketAddr>,
    unload_on_exit: bool,
) -> Result<()> {
    // Sockets the service manager kept for this daemon (its sentinels), taken before any
    // thread exists: the variables that name them are removed from the environment.
    let inherited = crate::sentinel::inherited_fds();
    // Signal handlers before anything is loaded: a SIGTERM that arrives while the guard starts
    // is handled once it runs, instead of killing the process half way.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let signals = {
        let _in_rt = rt.enter();
        Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        }
    };
    // Everything that can be checked without touching the kernel comes first.
    let metrics = match metrics_listen {
        Some(addr) => Some(
            rt.block_on(metrics::bind(addr))
                .with_context(|| format!("cannot listen for metrics on {addr}"))?,
        ),
        None => None,
    };
    raise_nofile();
    let cg = Cgroup2::find()?;
    let loaded = source.load(&cg)?;
    let policy = loaded.policy.clone();
    pin.preflight()?;
    // Before the probe: on kernels before 5.11 even the probe's program is charged to
    // RLIMIT_MEMLOCK, against everything the user has locked already (a pinned guard included).
    probe::raise_memlock();
    let features = probe::probe()?;
    for line in features.describe() {
        info!("{line}");
    }
    features.check(&policy)?;

    pin.prepare()?;
    let _lock = pin.lock()?;
    for line in pin.recover() {
        warn!("{line}");
    }
    let created_spawn_parent = !cg.dir(&policy.spawn_parent).exists();
    let spawn_parent_id = cg.create(&policy.spawn_parent)?;
    let started = Instant::now();
    let resolved = Resolved::new(policy, &cg, spawn_parent_id)?;
    if !features.netns_cookie && resolved.policy.netns != NetnsScope::All {
        warn!("this kernel cannot tell network namespaces apart in bind programs (no bpf_get_netns_cookie): the guard enforces in every netns, not only in {}", resolved.policy.netns);
    }
    // Where the netns-learning helper runs: a scratch cgroup of its own, below the spawn parent.
    let scratch = resolved
        .policy
        .spawn_parent
        .join(&format!("netns-learn-{}", std::process::id()))?;
    let mut guarded = None;
    let started_guard = Guard::start(pin, &resolved, features, &cg, |g| {
        let mut n = GuardedNetns::new(
            &resolved.policy.netns,
            features.netns_cookie,
            g,
            &cg,
            &scratch,
        )?;
        n.refresh(g, &cg, &scratch);
        g.maps.write_netns(&n.set(), n.scoped())?;
        guarded = Some(n);
        Ok(())
    });
    let mut guard = match started_guard {
        Ok(g) => g,
        Err(e) => {
            if created_spawn_parent {
                let _ = std::fs::remove_dir(cg.dir(&resolved.policy.spawn_parent));
            }
            if !pin.exists() {
                let _ = std::fs::remove_dir(pin.path());
            }
            return Err(e.into());
        }
    };
    let guarded = guarded.expect("Guard::start ran its before_attach");
    if let Err(e) = policy::sync_ephemeral(pin, &mut guard, &resolved.policy, features, &guarded) {
        if !guard.adopted {
            drop(guard);
            let _ = guard::unload(pin);
        }
        return Err(e);
    }
    let sentinels = if features.uses_sentinel(&resolved.policy) {
        let started =
            super::sentinel::Sentinels::new(&mut guard, resolved.policy.sentinel_port, inherited);
        match started {
            Ok(mut s) => {
                s.sync(&guarded.sentinel_targets());
                info!(
                    "refused binds get EADDRINUSE through the sentinel port {} (held in: {}); EPERM in a netns where it is not held",
                    s.port,
                    s.describe()
                );
                Some(s)
            }
            Err(e) => {
                if !guard.adopted {
                    drop(guard);
                    let _ = guard::unload(pin);
                }
                return Err(e.context("setting up the sentinel"));
            }
        }
    } else {
        // Kept by the service manager for a guard that refused through the sentinel: let go.
        for (name, _) in inherited
            .iter()
            .filter(|(n, _)| n.starts_with(crate::sentinel::FDNAME_PREFIX))
        {
            crate::notify::notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
        }
        None
    };
    if let Err(e) = guarded.record(pin) {
        warn!("recording the guarded network namespaces for spawn and check: {e}");
    }
    if guard.adopted {
        info!(
            "adopted the guard pinned at {} (its maps and leases are kept)",
            pin.path().display()
        );
    }
    super::record_counters(pin, &resolved, &guard.fresh_counters);
    let pid = std::process::id();
    let record = DaemonRecord {
        pid,
        starttime: crate::state::process_start(pid).unwrap_or(0),
        started: crate::leases::now_secs(),
        config: loaded.path.clone(),
        overrides: loaded.overrides.clone(),
        flags: source.flags.clone(),
        ranges: loaded.configured(),
        netns: loaded.policy.netns.to_string(),
        ..DaemonRecord::default()
    };
    // Before anything says "enforcing" (the log, READY=1): `status` and `reload` find this
    // daemon from then on.
    if let Err(e) = record.save(pin.path()) {
        warn!("recording the daemon's state for status and reload: {e}");
    }
    log_enforcing(&resolved, features, &guard, pin, started);
    info!("guarded network namespaces: {}", guarded.describe());
    for w in loaded.warnings() {
        warn!("{w}");
    }
    if !resolved.policy.protect_ephemeral {
        warn!("protect_ephemeral is off: a process the guard refuses can still get a reserved port the kernel picks for it (connect(), sendto(), bind() to port 0)");
    }
    // Who already holds a reserved port: the guard cannot evict them, the operator must know.
    if let Some(view) = crate::conflicts::View::from_pins(pin, &cg) {
        let (_, holders, _) = crate::conflicts::find_in(&view, &resolved.policy.netns);
        for h in holders.iter().filter(|h| h.would_refuse) {
            warn!(
                "conflict: a reserved port is already held: {}",
                crate::conflicts::describe(h)
            );
        }
    }
    crate::notify::notify(&format!(
        "READY=1\nSTATUS=guard enforcing on {}",
        resolved.policy.attach
    ));
    let daemon = Daemon::new(
        pin, &cg, source, guard, resolved, features, guarded, scratch, record, sentinels,
    )?;
    let exit = rt.block_on(serve(daemon, signals, metrics))?;
    crate::notify::notify("STOPPING=1");
    if matches!(exit, Exit::Unloaded) {
        return Ok(());
    }
    if unload_on_exit {
        match guard::unload(pin) {
            Ok(()) => info!("guard detached and unpinned (--unload-on-exit)"),
            Err(guard::GuardError::PinDir(crate::pin::PinError::NotLoaded(_))) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The soft limit on open files up to the hard one: the daemon's fds (maps, links, inotify,
/// metrics connections) must never run out.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn log_enforcing(r: &Resolved, features: Features, guard: &Guard, pin: &PinDir, started: Instant) {
    let p = &r.policy;
    info!(
        "guard enforcing: attach={} mode={} errno={} ranges={} leases={} pin_dir={} ({} ms)",
        p.attach,
        p.mode.name(),
        if features.set_retval {
            p.errno.c_name()
        } else {
            "EPERM"
        },
        p.reserve
            .iter()
            .map(|r| {
                let allow: Vec<&str> = r.allow.iter().map(CgroupPath::as_str).collect();
                format!(
                    "{}[allow:{}]",
                    r.spec,
                    if allow.is_empty() {
                        "-".into()
                    } else {
                        allow.join(",")
                    }
                )
            })
            .collect::<Vec<_>>()
            .join(" "),
        guard.maps.leases().all().map(|l| l.len()).unwrap_or(0),
        pin.path().display(),
        started.elapsed().as_millis(),
    );
}
