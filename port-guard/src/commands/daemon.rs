//! `port-guard daemon`: validate, load or adopt, then log denials until a signal.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use log::{error, info, warn};
use port_guard_common::{FLAG_RETVAL, MAP_EVENTS};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    cgroup::{Cgroup2, CgroupPath},
    cli::DaemonArgs,
    config::{build_policy, check_cgroups, ConfigFile, Overrides},
    events,
    guard::{self, CgroupNames, Guard, PinDir, Resolved},
    policy::{Errno, Policy},
    probe,
    reaper::{Reaper, Wake},
};

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// Everything the daemon needs to (re)build its policy.
struct Source<'a> {
    config: Option<&'a Path>,
    flags: Overrides,
}

impl Source<'_> {
    fn policy(&self, cg: &Cgroup2) -> Result<Policy> {
        let (file, path) = ConfigFile::load(self.config)?;
        let policy = build_policy(&file, path.as_deref(), &self.flags)?;
        for missing in check_cgroups(&policy, cg)? {
            warn!(
                "allowed cgroup {missing} does not exist yet; it is allowed as soon as it appears"
            );
        }
        Ok(policy)
    }
}

pub fn run(pin: &PinDir, config: Option<&Path>, args: DaemonArgs) -> Result<()> {
    let source = Source {
        config,
        flags: Overrides {
            attach: args.attach,
            reserve: args.reserve,
            allow: args.allow,
            mode: args.mode,
            errno: args.errno,
            protect_ephemeral: args.protect_ephemeral,
            allow_fallback: args.allow_fallback,
            spawn_parent: args.spawn_parent,
        },
    };
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
    let metrics = match args.metrics_listen {
        Some(addr) => Some(
            rt.block_on(crate::metrics::bind(addr))
                .with_context(|| format!("cannot listen for metrics on {addr}"))?,
        ),
        None => None,
    };
    let cg = Cgroup2::find()?;
    let policy = source.policy(&cg)?;
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
    let mut guard = match Guard::start(pin, &resolved, features, &cg) {
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
    if let Err(e) = sync_ephemeral(pin, &mut guard, &resolved.policy) {
        if !guard.adopted {
            drop(guard);
            let _ = guard::unload(pin);
        }
        return Err(e);
    }
    if guard.adopted {
        info!(
            "adopted the guard pinned at {} (its maps and leases are kept)",
            pin.path().display()
        );
    }
    let p = &resolved.policy;
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
        guard.maps.leases().map(|l| l.len()).unwrap_or(0),
        pin.path().display(),
        started.elapsed().as_millis(),
    );

    // Who already holds a reserved port: the guard cannot evict them, the operator must know.
    if let Some(view) = crate::conflicts::View::from_pins(pin, &cg) {
        let (_, holders) = crate::conflicts::find(&view);
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
    let unload = rt.block_on(serve(
        pin, &cg, &source, guard, resolved, features, signals, metrics,
    ))?;
    crate::notify::notify("STOPPING=1");
    if unload || args.unload_on_exit {
        match guard::unload(pin) {
            Ok(()) => info!("guard detached and unpinned (--unload-on-exit)"),
            Err(guard::GuardError::NotLoaded(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The event loop. Returns whether the caller should unload.
#[expect(
    clippy::too_many_arguments,
    reason = "the loop owns everything start-up made; one call site"
)]
async fn serve(
    pin: &PinDir,
    cg: &Cgroup2,
    source: &Source<'_>,
    mut guard: Guard,
    mut resolved: Resolved,
    features: probe::Features,
    mut signals: Signals,
    metrics: Option<tokio::net::TcpListener>,
) -> Result<bool> {
    let mut stats = crate::metrics::DaemonStats::default();
    let (scrape_tx, mut scrapes) = tokio::sync::mpsc::channel::<crate::metrics::Scrape>(16);
    if let Some(listener) = metrics {
        info!(
            "metrics on http://{}/metrics",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        tokio::spawn(crate::metrics::serve(listener, scrape_tx));
    } else {
        drop(scrape_tx);
    }
    let ring = guard
        .ebpf
        .take_map(MAP_EVENTS)
        .context("the object has no event ring buffer")?;
    let ring: RingBuf<MapData> = RingBuf::try_from(ring)?;
    // SAFETY: the ring buffer owns its fd, and the AsyncFd owns the ring buffer: the fd stays
    // open for as long as it is registered.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| e.into_parts().1)
        .context("watching the event ring buffer")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The programs' own debug records (aya-log), read for as long as the daemon runs.
    let mut ebpf_log = match aya_log::EbpfLogger::init(&mut guard.ebpf) {
        // SAFETY: the logger owns its ring buffer fd; the AsyncFd owns the logger.
        Ok(l) => Some(
            unsafe { AsyncFd::register(l) }
                .map_err(|e| e.into_parts().1)
                .context("watching the aya-log ring buffer")?,
        ),
        Err(e) => {
            warn!("no eBPF log records: {e}");
            None
        }
    };
    let mut names = CgroupNames::new(cg);
    let mut budget = LogBudget::new();
    let mut lost = LostEvents::new(&guard.maps);
    let mut reaper = Reaper::new().context("starting the lease reaper (inotify)")?;
    // Leases whose VM ended while no daemon ran.
    reaper.run(
        Wake::Full,
        &mut guard.maps,
        cg,
        &mut names,
        Some(&resolved.policy.spawn_parent),
    );
    // Allowed cgroups are followed by path: a service's cgroup appears (or is re-created) when
    // the service starts, and is allowed from that instant.
    let allow_watch =
        crate::inotify::Inotify::new().context("watching allowed cgroups (inotify)")?;
    watch_allowed(cg, &allow_watch, &resolved);
    refresh_allowed(cg, &mut guard, &mut resolved, features);
    let allow_events = unsafe { AsyncFd::register(allow_watch.fd().try_clone()?) }
        .map_err(|e| e.into_parts().1)
        .context("watching allowed cgroups")?;
    let inotify = reaper
        .watcher
        .inotify
        .fd()
        .try_clone()
        .context("duplicating the inotify fd")?;
    // SAFETY: the AsyncFd owns its duplicate of the inotify fd.
    let inotify = unsafe { AsyncFd::register(inotify) }
        .map_err(|e| e.into_parts().1)
        .context("watching cgroup.events")?;

    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut ready = ready.context("waiting for denial events")?;
                let errno = resolved.policy.errno;
                let retval = guard.maps.config().map(|c| c.flags & FLAG_RETVAL != 0).unwrap_or(false);
                // Clear readiness only when empty: the ring buffer wakes us on new data only.
                if drain(ready.get_inner_mut(), &mut names, &mut budget, errno, retval) {
                    ready.clear_ready();
                } else {
                    tokio::task::yield_now().await;
                }
            }
            ready = allow_events.readable() => {
                let mut ready = ready.context("waiting for cgroup creation events")?;
                if allow_watch.drain() {
                    refresh_allowed(cg, &mut guard, &mut resolved, features);
                    watch_allowed(cg, &allow_watch, &resolved);
                }
                ready.clear_ready();
            }
            ready = inotify.readable() => {
                let mut ready = ready.context("waiting for cgroup events")?;
                reaper.run(Wake::Inotify, &mut guard.maps, cg, &mut names, Some(&resolved.policy.spawn_parent));
                ready.clear_ready();
            }
            ready = async { ebpf_log.as_mut().expect("guarded by the if").readable_mut().await }, if ebpf_log.is_some() => {
                let mut ready = ready.context("waiting for eBPF log records")?;
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
            _ = signals.term.recv() => { info!("SIGTERM: exiting, the guard stays in place"); break; }
            _ = signals.int.recv() => { info!("SIGINT: exiting, the guard stays in place"); break; }
            Some(reply) = scrapes.recv() => {
                stats.leases_reaped = reaper.reaped;
                stats.denial_lines_suppressed = budget.total_suppressed;
                match crate::metrics::render(&guard.maps, pin, &stats) {
                    Ok(text) => { let _ = reply.send(text); }
                    Err(e) => warn!("rendering metrics: {e:#}"),
                }
            }
            _ = signals.hup.recv() => {
                crate::notify::notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", crate::notify::monotonic_usec()));
                let result = reload(pin, cg, source, &mut guard, &resolved, features);
                crate::notify::notify("READY=1");
                match result {
                    Ok(r) => {
                        stats.reloads_ok += 1;
                        watch_allowed(cg, &allow_watch, &r);
                        info!("SIGHUP: config reloaded: mode={} errno={} ranges={}", r.policy.mode.name(), r.policy.errno.name(),
                            r.policy.reserve.iter().map(|x| x.spec.to_string()).collect::<Vec<_>>().join(" "));
                        resolved = r;
                    }
                    Err(e) => {
                        stats.reloads_failed += 1;
                        error!("SIGHUP: new config refused, the old one stays in force: {e:#}");
                    }
                }
            }
            _ = tick.tick() => {
                if !pin.has_links() {
                    info!("the guard's pins at {} are gone (`port-guard unload`?): exiting", pin.path().display());
                    return Ok(false);
                }
                budget.flush();
                refresh_allowed(cg, &mut guard, &mut resolved, features);
                reaper.run(Wake::Tick, &mut guard.maps, cg, &mut names, Some(&resolved.policy.spawn_parent));
                lost.check(&guard.maps);
            }
        }
    }
    // Log what arrived before the signal.
    let errno = resolved.policy.errno;
    while !drain(
        ring.get_mut(),
        &mut names,
        &mut budget,
        errno,
        features.set_retval,
    ) {}
    budget.flush();
    Ok(false)
}

/// Denial lines logged per second at most; the rest are counted and summarised, so a flood
/// neither fills the journal nor starves the loop (the kernel counters stay exact).
const LOG_LINES_PER_SEC: u32 = 200;
/// Events handled per wake-up before the loop looks at its other work.
const EVENTS_PER_TURN: usize = 4096;

/// Says when the kernel had to drop denial events (ring buffer full): the denials are counted
/// in full, but the log misses some of their lines.
struct LostEvents {
    seen: u64,
}

impl LostEvents {
    fn new(maps: &crate::guard::Maps) -> LostEvents {
        LostEvents {
            seen: maps.events_lost().unwrap_or(0),
        }
    }

    fn check(&mut self, maps: &crate::guard::Maps) {
        let Ok(now) = maps.events_lost() else { return };
        if now > self.seen {
            warn!(
                "{} denial events were lost (the event ring buffer was full); the denial counters are exact, see `port-guard status`",
                now - self.seen
            );
            self.seen = now;
        }
    }
}

/// Rate limit for denial lines.
struct LogBudget {
    window: Instant,
    used: u32,
    suppressed: u64,
    total_suppressed: u64,
}

impl LogBudget {
    fn new() -> LogBudget {
        LogBudget {
            window: Instant::now(),
            used: 0,
            suppressed: 0,
            total_suppressed: 0,
        }
    }

    fn take(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.flush();
            self.window = Instant::now();
            self.used = 0;
        }
        if self.used < LOG_LINES_PER_SEC {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            self.total_suppressed += 1;
            false
        }
    }

    fn flush(&mut self) {
        if self.suppressed > 0 {
            warn!("{} more denials not logged (over {LOG_LINES_PER_SEC} lines/s); `port-guard status` counts them all", self.suppressed);
            self.suppressed = 0;
        }
    }
}

/// Logs up to [`EVENTS_PER_TURN`] events; returns whether the ring buffer is empty.
fn drain(
    ring: &mut RingBuf<MapData>,
    names: &mut CgroupNames<'_>,
    budget: &mut LogBudget,
    errno: Errno,
    retval: bool,
) -> bool {
    for _ in 0..EVENTS_PER_TURN {
        let Some(item) = ring.next() else { return true };
        let Some(ev) = events::decode(&item) else {
            warn!("short event record ({} bytes)", item.len());
            continue;
        };
        drop(item);
        if budget.take() {
            let cgroup = names.name_for_log(ev.cgroup_id, Duration::from_secs(1));
            warn!("{}", events::log_line(&ev, &cgroup, errno, retval));
        }
    }
    false
}

/// Applies or withdraws ephemeral-port protection to match `policy`, and records it in the
/// config map for `status`.
fn sync_ephemeral(pin: &PinDir, guard: &mut Guard, policy: &Policy) -> Result<()> {
    use port_guard_common::FLAG_PROTECT_EPHEMERAL;
    if policy.protect_ephemeral {
        let ranges: Vec<_> = policy.reserve.iter().map(|r| r.spec.range).collect();
        let value = crate::ephemeral::apply(pin, &ranges)?;
        guard.maps.set_flag(FLAG_PROTECT_EPHEMERAL, true)?;
        info!("ephemeral ports protected: net.ipv4.ip_local_reserved_ports = {value}");
    } else if let Some(previous) = crate::ephemeral::restore(pin)? {
        guard.maps.set_flag(FLAG_PROTECT_EPHEMERAL, false)?;
        info!("ephemeral-port protection off: net.ipv4.ip_local_reserved_ports restored to {previous:?}");
    }
    Ok(())
}

/// SIGHUP: builds and checks the new policy completely, then updates the maps in place.
fn reload(
    pin: &PinDir,
    cg: &Cgroup2,
    source: &Source<'_>,
    guard: &mut Guard,
    old: &Resolved,
    features: probe::Features,
) -> Result<Resolved> {
    let policy = source.policy(cg)?;
    if policy.attach != old.policy.attach {
        bail!(
            "attach changed from {} to {}: restart the daemon to move the guard",
            old.policy.attach,
            policy.attach
        );
    }
    let spawn_parent_id = if policy.spawn_parent == old.policy.spawn_parent {
        old.spawn_parent_id
    } else {
        cg.create(&policy.spawn_parent)?
    };
    let r = Resolved::new(policy, cg, spawn_parent_id)?;
    guard.maps.write_policy(&r, features)?;
    sync_ephemeral(pin, guard, &r.policy)?;
    Ok(r)
}

fn watch_allowed(cg: &Cgroup2, w: &crate::inotify::Inotify, r: &Resolved) {
    let dirs = r
        .policy
        .reserve
        .iter()
        .flat_map(|res| res.allow.iter().map(|p| cg.dir(p)));
    crate::reaper::watch_parents(w, dirs);
}

/// Allowed cgroups are matched by id, and a cgroup that is removed and created again (systemd
/// restarting libvirtd.service) gets a new one: follow the paths. A path that is missing for now
/// keeps its last id.
fn refresh_allowed(
    cg: &Cgroup2,
    guard: &mut Guard,
    resolved: &mut Resolved,
    features: probe::Features,
) {
    let mut next = resolved.clone();
    let mut news = Vec::new();
    for (i, r) in resolved.policy.reserve.iter().enumerate() {
        for (j, path) in r.allow.iter().enumerate() {
            if let Ok(id) = cg.id(path) {
                let old = resolved.allowed[i][j].0;
                if id != old {
                    next.allowed[i][j].0 = id;
                    news.push(if old == 0 {
                        format!("allowed cgroup {path} appeared (id {id}); allowed")
                    } else {
                        format!("allowed cgroup {path} was re-created (id {old} -> {id}); followed")
                    });
                }
            }
        }
    }
    if news.is_empty() {
        return;
    }
    match guard.maps.write_policy(&next, features) {
        Ok(()) => {
            *resolved = next;
            // Logged once in force.
            news.dedup();
            for n in news {
                info!("{n}");
            }
        }
        Err(e) => error!("updating allowed cgroups: {e}"),
    }
}
