//! Start-up: everything that can be checked without the kernel first (the config, the metrics
//! address, the pin dir), then the probe, the pins, the guard, ephemeral protection and the
//! sentinels; then the [`Daemon`] serves until it is told to stop. [`run`] reads as these steps.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::{
    runtime::Runtime,
    signal::unix::{signal, SignalKind},
};

use super::{
    netns::GuardedNetns, policy, sentinel::Sentinels, serve, Daemon, Exit, Signals, Source,
};
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

/// How long the start-up scan for ports already held may take before it gives up (it runs after
/// READY=1, in the background).
const CONFLICT_SCAN_DEADLINE: Duration = Duration::from_secs(60);

/// Starts the daemon and serves until it is told to stop.
pub fn run(pin: &PinDir, source: Source<'_>, unload_on_exit: bool) -> Result<()> {
    // Sockets the service manager kept for this daemon (its sentinels), taken before any
    // thread exists: the variables that name them are removed from the environment.
    let inherited = crate::sentinel::inherited_fds();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let signals = signals(&rt)?;
    // Everything that can be checked without touching the kernel comes first.
    let cg = Cgroup2::find()?;
    let loaded = source.load(&cg)?;
    let outputs = metrics_outputs(&rt, &loaded.metrics)?;
    raise_nofile();
    pin.preflight()?;
    // Before the probe: on kernels before 5.11 even the probe's program is charged to
    // RLIMIT_MEMLOCK, against everything the user has locked already (a pinned guard included).
    probe::raise_memlock();
    let features = probe::probe()?;
    for line in features.describe() {
        info!("{line}");
    }
    features.check(&loaded.policy)?;
    pin.prepare()?;
    let _lock = pin.lock()?;
    for line in pin.recover() {
        warn!("{line}");
    }
    crate::cgroup::check_handles(&cg);
    let started = Instant::now();
    let Started {
        mut guard,
        resolved,
        guarded,
        scratch,
        news,
    } = start_guard(pin, &cg, loaded.policy.clone(), features)?;
    let sentinels = start_sentinels(pin, &mut guard, &resolved, features, &guarded, inherited)?;
    let record = record(pin, &source, &loaded, &guard, &guarded);
    announce(&resolved, features, &guard, pin, started, &guarded, &loaded);
    for line in news {
        info!("{line}");
    }
    crate::notify::notify(&format!(
        "READY=1\nSTATUS=guard {} on {}",
        mode_word(&resolved),
        resolved.policy.attach
    ));
    scan_conflicts_in_background(pin, &cg, &resolved);
    let daemon = Daemon::new(
        pin,
        &cg,
        source,
        guard,
        resolved,
        features,
        guarded,
        scratch,
        record,
        sentinels,
        outputs.settings,
    )?;
    let exit = rt.block_on(serve(daemon, signals, outputs.listener))?;
    crate::notify::notify("STOPPING=1");
    finish(pin, exit, unload_on_exit)
}

/// Signal handlers before anything is loaded: a SIGTERM that arrives while the guard starts is
/// handled once it runs, instead of killing the process half way.
fn signals(rt: &Runtime) -> Result<Signals> {
    let _in_rt = rt.enter();
    Ok(Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        hup: signal(SignalKind::hangup())?,
    })
}

/// Where the metrics go, checked before the kernel is touched: a busy address or an unusable
/// directory fails the start cleanly.
struct Outputs {
    listener: Option<metrics::Listener>,
    settings: crate::config::MetricsSettings,
}

fn metrics_outputs(rt: &Runtime, m: &crate::config::MetricsSettings) -> Result<Outputs> {
    let listener = match &m.listen {
        Some(ep) => Some(
            rt.block_on(metrics::bind(ep))
                .with_context(|| format!("cannot listen for metrics on {ep}"))?,
        ),
        None => None,
    };
    if let Some(path) = &m.textfile {
        let dir = path.parent().unwrap_or(std::path::Path::new("/"));
        if !dir.is_dir() {
            anyhow::bail!(
                "cannot write the metrics textfile {}: {} is not a directory (create it, or point metrics_textfile at node_exporter's textfile directory)",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(Outputs {
        listener,
        settings: m.clone(),
    })
}

/// What [`start_guard`] made.
struct Started {
    guard: Guard,
    resolved: Resolved,
    guarded: GuardedNetns,
    /// Where the netns-learning helper runs.
    scratch: CgroupPath,
    /// Namespaces guarded from the start, said once the guard enforces.
    news: Vec<String>,
}

/// Loads (or adopts) and attaches the guard, learns the guarded namespaces, protects ephemeral
/// ports. A first load that fails leaves nothing behind.
fn start_guard(
    pin: &PinDir,
    cg: &Cgroup2,
    policy: crate::policy::Policy,
    features: Features,
) -> Result<Started> {
    let created_spawn_parent = !cg.dir(&policy.spawn_parent).exists();
    let spawn_parent_id = cg.create(&policy.spawn_parent)?;
    let resolved = Resolved::new(policy, cg, spawn_parent_id)?;
    if !features.netns_cookie && resolved.policy.netns != NetnsScope::All {
        warn!("this kernel cannot tell network namespaces apart in bind programs (no bpf_get_netns_cookie): the guard enforces in every netns, not only in {}", resolved.policy.netns);
    }
    // A scratch cgroup of its own, below the spawn parent.
    let scratch = resolved
        .policy
        .spawn_parent
        .join(&format!("netns-learn-{}", std::process::id()))?;
    let mut guarded = None;
    let mut news = Vec::new();
    let started = Guard::start(pin, &resolved, features, cg, |g| {
        let mut n = GuardedNetns::new(
            &resolved.policy.netns,
            features.netns_cookie,
            g,
            cg,
            &scratch,
        )?;
        news = n.refresh(g, cg, &scratch).1;
        g.maps.write_netns(&n.set(), n.scoped())?;
        guarded = Some(n);
        Ok(())
    });
    let mut guard = match started {
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
    if let Err(e) = policy::sync_ephemeral(
        pin,
        &mut guard,
        &resolved.policy,
        features,
        &guarded,
        &Default::default(),
    ) {
        if !guard.adopted {
            drop(guard);
            let _ = guard::unload(pin);
        }
        return Err(e);
    }
    Ok(Started {
        guard,
        resolved,
        guarded,
        scratch,
        news,
    })
}

/// Where refusals go through the sentinel port: the sentinels, holding it in every guarded
/// netns (adopted from the service manager's fd store when it kept them). Elsewhere, lets go of
/// what the fd store kept.
fn start_sentinels(
    pin: &PinDir,
    guard: &mut Guard,
    resolved: &Resolved,
    features: Features,
    guarded: &GuardedNetns,
    inherited: Vec<(String, std::os::fd::OwnedFd)>,
) -> Result<Option<Sentinels>> {
    if !features.uses_sentinel(&resolved.policy) {
        // Kept by the service manager for a guard that refused through the sentinel: let go.
        for (name, _) in inherited
            .iter()
            .filter(|(n, _)| n.starts_with(crate::sentinel::FDNAME_PREFIX))
        {
            crate::notify::notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
        }
        return Ok(None);
    }
    let reserved = resolved
        .policy
        .reserve
        .iter()
        .map(|r| r.spec.range)
        .collect();
    match Sentinels::new(guard, resolved.policy.sentinel_port, reserved, inherited) {
        Ok(mut s) => {
            if s.sync(&guarded.sentinel_targets(), &mut guard.maps) && resolved.policy.protect_ephemeral
            {
                // A sentinel took another port: the kernel must not hand it out either.
                if let Err(e) = policy::sync_ephemeral(
                    pin,
                    guard,
                    &resolved.policy,
                    features,
                    guarded,
                    &s.ports(),
                ) {
                    warn!("protecting the port the sentinel took from ephemeral use: {e:#}");
                }
            }
            info!(
                "refused binds get EADDRINUSE through the sentinel port {}; EPERM in a netns where none is held",
                s.describe()
            );
            Ok(Some(s))
        }
        Err(e) => {
            if !guard.adopted {
                let _ = guard::unload(pin);
            }
            Err(e.context("setting up the sentinel"))
        }
    }
}

/// The daemon's record, saved before anything says "enforcing" (the log, READY=1): `status`
/// and `reload` find this daemon from then on.
fn record(
    pin: &PinDir,
    source: &Source<'_>,
    loaded: &policy::Loaded,
    guard: &Guard,
    guarded: &GuardedNetns,
) -> DaemonRecord {
    if let Err(e) = guarded.record(pin) {
        warn!("recording the guarded network namespaces for spawn and check: {e}");
    }
    if guard.adopted {
        info!(
            "adopted the guard pinned at {} (its maps and leases are kept)",
            pin.path().display()
        );
    }
    let pid = std::process::id();
    let record = DaemonRecord {
        pid,
        starttime: crate::state::process_start(pid).unwrap_or(0),
        started: crate::leases::now_secs(),
        config: loaded.path.clone(),
        config_digest: loaded.digest.clone(),
        overrides: loaded.overrides.clone(),
        flags: source.flags.clone(),
        ranges: loaded.configured(),
        netns: loaded.policy.netns.to_string(),
        ..DaemonRecord::default()
    };
    if let Err(e) = record.save(pin.path()) {
        warn!("recording the daemon's state for status and reload: {e}");
    }
    record
}

/// `enforcing` or `auditing`, as the start-up line and systemd's STATUS= say it.
fn mode_word(r: &Resolved) -> &'static str {
    match r.policy.mode {
        crate::policy::Mode::Enforce => "enforcing",
        crate::policy::Mode::Audit => "auditing (nothing is refused)",
    }
}

/// The start-up lines: the guard in force, the namespaces, the warnings.
fn announce(
    r: &Resolved,
    features: Features,
    guard: &Guard,
    pin: &PinDir,
    started: Instant,
    guarded: &GuardedNetns,
    loaded: &policy::Loaded,
) {
    super::record_counters(pin, r, &guard.fresh_counters);
    log_started(r, features, guard, pin, started);
    info!("guarded network namespaces: {}", guarded.describe());
    for w in loaded.warnings() {
        warn!("{w}");
    }
    if !r.policy.protect_ephemeral {
        warn!("protect_ephemeral is off: a process the guard refuses can still get a reserved port the kernel picks for it (connect(), sendto(), bind() to port 0)");
    }
}

/// Who already holds a reserved port: the guard cannot evict them, the operator must know. In
/// the background, after READY=1: naming the holders reads every process's fds, which costs time
/// in proportion to what other users hold.
fn scan_conflicts_in_background(pin: &PinDir, cg: &Cgroup2, r: &Resolved) {
    let (pin, cg, netns) = (pin.clone(), cg.clone(), r.policy.netns.clone());
    let spawned = std::thread::Builder::new()
        .name("conflict-scan".into())
        .spawn(move || {
            let t = Instant::now();
            let Some(view) = crate::conflicts::View::from_pins(&pin, &cg) else {
                return;
            };
            let deadline = t + CONFLICT_SCAN_DEADLINE;
            let (scan, holders, _) = crate::conflicts::find_in_until(&view, &netns, deadline);
            for h in holders.iter().filter(|h| h.would_refuse) {
                warn!(
                    "conflict: a reserved port is already held: {}",
                    crate::conflicts::describe(h)
                );
            }
            if scan.partial {
                warn!(
                    "the start-up scan for reserved ports already held gave up after {} s, before it had named every holder: `port-guard check` completes it",
                    CONFLICT_SCAN_DEADLINE.as_secs()
                );
            }
        });
    if let Err(e) = spawned {
        warn!("cannot scan for reserved ports already held: {e}");
    }
}

/// After the loop: the guard stays (unless `--unload-on-exit`).
fn finish(pin: &PinDir, exit: Exit, unload_on_exit: bool) -> Result<()> {
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
/// lessee cgroups, metrics connections) must never run out.
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

/// `guard enforcing: attach=/ mode=enforce errno=EADDRINUSE ranges=… leases=N pin_dir=… (N ms)`,
/// or `guard auditing (nothing is refused): … mode=audit would_errno=…` in audit mode. The errno
/// is what refused binds get on this kernel.
fn log_started(r: &Resolved, features: Features, guard: &Guard, pin: &PinDir, started: Instant) {
    let p = &r.policy;
    let errno = if features.set_retval || features.uses_sentinel(p) {
        p.errno.c_name()
    } else {
        "EPERM"
    };
    let audit = p.mode == crate::policy::Mode::Audit;
    info!(
        "guard {}: attach={} mode={} {}={} ranges={} leases={} pin_dir={} ({} ms)",
        mode_word(r),
        p.attach,
        p.mode.name(),
        if audit { "would_errno" } else { "errno" },
        errno,
        p.reserve
            .iter()
            .map(|r| {
                let allow: Vec<&str> = r.allow.iter().map(CgroupPath::as_str).collect();
                format!(
                    "{}[allow:{}{}]",
                    r.spec,
                    if allow.is_empty() {
                        "-".into()
                    } else {
                        allow.join(",")
                    },
                    if r.per_child_limit != 0 {
                        format!(" per_child_limit:{}", r.per_child_limit)
                    } else {
                        String::new()
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
