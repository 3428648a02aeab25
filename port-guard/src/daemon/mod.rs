//! `port-guard daemon`: validate, load or adopt, then serve until a signal.
//!
//! [`run`] does the start-up, in an order that checks everything it can before it touches the
//! kernel. The [`Daemon`] then owns everything start-up made and has one method per event
//! source: denial events (`on_denials`), allowed cgroups appearing (`on_allowed_cgroups`),
//! lessee cgroups changing (`on_cgroup_events`), the one-second tick (`on_tick`), SIGHUP
//! (`on_reload`, in [`policy`]) and metrics scrapes (`on_scrape`). [`serve`] joins them in one
//! `select!`.

mod netns;
mod policy;
mod sentinel;
mod start;

use std::{
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData, RingBuf};
use log::{error, info, warn};
use port_guard_common::{MAP_BUDGET, MAP_CGROUP_DENIALS, MAP_EVENTS};
use tokio::{
    io::unix::{AsyncFd, AsyncFdReadyGuard, AsyncFdReadyMutGuard},
    signal::unix::Signal,
};

pub use self::{
    policy::{Loaded, Source},
    start::run,
};
use crate::{
    cgroup::{Cgroup2, CgroupNames, CgroupPath},
    events::{DenialLog, OffenderMaps},
    guard::{Guard, PinCheck},
    inotify::Inotify,
    maps::Resolved,
    metrics::{self, DaemonStats},
    pin::PinDir,
    policy::Errno,
    probe::Features,
    reaper::{self, Reaper, Wake},
    state::DaemonRecord,
};

/// How often the sysctl of ephemeral protection is looked at (inotify does not see /proc/sys).
const SYSCTL_EVERY: Duration = Duration::from_secs(3);
/// How long links may look detached while their pins remain before the daemon gives up: an
/// `unload` detaches first and removes the pins a moment later.
const DETACHED_GRACE: Duration = Duration::from_secs(2);
/// How often the daemon's counts and the metrics textfile are written.
const OUTPUTS_EVERY: Duration = Duration::from_secs(5);

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// Why the loop ended.
enum Exit {
    /// SIGTERM or SIGINT: the guard stays.
    Signal,
    /// Someone ran `port-guard unload`.
    Unloaded,
}

/// Everything the daemon owns while it runs.
struct Daemon<'a> {
    pin: &'a PinDir,
    cg: &'a Cgroup2,
    source: Source<'a>,
    guard: Guard,
    resolved: Resolved,
    features: Features,
    names: CgroupNames<'a>,
    /// Where the metrics go (the listener is served on its own task).
    metrics: crate::config::MetricsSettings,
    /// Idle metrics connections closed for new ones (shared with the listener's task).
    metrics_evicted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    last_outputs: Instant,
    denials: DenialLog,
    offenders: Option<OffenderMaps>,
    reaper: Reaper,
    allow_watch: Inotify,
    stats: DaemonStats,
    last_sysctl_check: Instant,
    detached_since: Option<Instant>,
    netns: netns::GuardedNetns,
    /// Where the netns-learning helper runs.
    scratch: CgroupPath,
    /// What the daemon tells `status` and `reload` about itself.
    record: DaemonRecord,
    /// Where refusals go through the sentinel port: its sockets.
    sentinels: Option<sentinel::Sentinels>,
}

impl Daemon<'_> {
    /// Denial events: logs what is there. Returns whether the ring buffer is empty.
    fn on_denials(&mut self, ring: &mut RingBuf<MapData>) -> bool {
        let errno = self.errno();
        self.denials.drain(ring, &mut self.names, errno)
    }

    /// The errno a denial gets, and whether the programs can set it (for the log lines).
    fn errno(&self) -> (Errno, bool) {
        (self.resolved.policy.errno, self.features.set_retval)
    }

    /// Denials that got no line of their own, summarised: every `SUMMARY_EVERY`, or now when
    /// `force`d.
    fn summarise_denials(&mut self, force: bool) {
        let errno = self.errno();
        if let Some(offenders) = &self.offenders {
            self.denials
                .summarise(offenders, &self.guard.maps, &mut self.names, errno, force);
        }
    }

    /// An allowed cgroup (or an ancestor of one) was created or removed.
    fn on_allowed_cgroups(&mut self) {
        if self.allow_watch.drain() {
            self.refresh_allowed();
            self.watch_allowed();
        }
    }

    /// A lessee cgroup emptied or went away.
    fn on_cgroup_events(&mut self) {
        self.reap(Wake::Inotify);
    }

    fn reap(&mut self, wake: Wake) {
        let spawn_parent = self.resolved.policy.spawn_parent.clone();
        self.reaper.run(
            wake,
            &mut reaper::Ctx {
                maps: &mut self.guard.maps,
                cg: self.cg,
                names: &mut self.names,
                spawn_parent: &spawn_parent,
            },
        );
    }

    /// The one-second tick. Returns why to stop, if it is time to.
    fn on_tick(&mut self) -> Result<Option<Exit>> {
        if let Some(exit) = self.check_pins()? {
            return Ok(Some(exit));
        }
        self.refresh_allowed();
        self.refresh_netns();
        self.names.poll();
        self.reap(Wake::Tick);
        self.denials.check_lost(&self.guard.maps);
        self.summarise_denials(false);
        if self.resolved.policy.protect_ephemeral
            && self.last_sysctl_check.elapsed() >= SYSCTL_EVERY
        {
            self.last_sysctl_check = Instant::now();
            self.repair_ephemeral();
        }
        if self.last_outputs.elapsed() >= OUTPUTS_EVERY {
            self.last_outputs = Instant::now();
            self.write_outputs();
        }
        Ok(None)
    }

    /// The loop ended: what arrived before the signal is logged, then what got no line of its
    /// own; the sentinels stop; the records are left as `status` should find them.
    fn on_exit(&mut self, exit: &Exit, ring: &mut RingBuf<MapData>) {
        while !self.on_denials(ring) {}
        self.summarise_denials(true);
        if let Some(s) = &mut self.sentinels {
            s.stop();
        }
        if matches!(exit, Exit::Unloaded) {
            // The guard is gone, and its records with it: nothing is left to describe.
            crate::state::remove_daemon_files(self.pin.path());
        } else {
            self.write_outputs();
            self.record.stopped = Some(crate::leases::now_secs());
            self.save_record();
        }
    }

    /// Every [`OUTPUTS_EVERY`]: the daemon's counts to the state dir (for `status --prometheus`
    /// while no daemon runs) and, with `metrics_textfile`, the metrics to that file.
    fn write_outputs(&mut self) {
        self.update_stats();
        if let Err(e) = crate::state::save_stats(self.pin.path(), &self.stats) {
            warn!("recording the daemon's counts: {e}");
        }
        if let Some(path) = self.metrics.textfile.clone() {
            if let Some(text) = self.on_scrape() {
                if let Err(e) = metrics::textfile::write(&path, &text) {
                    warn!("writing the metrics to {}: {e}", path.display());
                }
            }
        }
    }

    /// Pins that vanished are put back; links detached by `unload` end the daemon; links
    /// detached otherwise end it with an error, so that the service manager starts it again.
    fn check_pins(&mut self) -> Result<Option<Exit>> {
        let dir = self.pin.path().display();
        match self.guard.check_pins(self.pin) {
            Ok(PinCheck::Intact) => {
                self.detached_since = None;
                self.stats.attached = true;
            }
            Ok(PinCheck::Repinned(names)) => {
                self.stats.pins_restored += names.len() as u64;
                self.stats.attached = true;
                error!("the guard's pins {} at {dir} were removed while its links were attached; pinned them again from the daemon's own file descriptors", names.join(", "));
            }
            Ok(PinCheck::Unloaded) => {
                info!("the guard at {dir} was unloaded (its links detached and its pins removed, `port-guard unload`): exiting");
                return Ok(Some(Exit::Unloaded));
            }
            Ok(PinCheck::Detached(links)) => {
                self.stats.attached = false;
                let since = *self.detached_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= DETACHED_GRACE {
                    anyhow::bail!(
                        "the guard's links {} were detached while their pins at {dir} remain: binds are not checked; exiting with an error so that the service manager starts the daemon again, which attaches anew",
                        links.join(", ")
                    );
                }
            }
            // No evidence either way: look again at the next tick.
            Err(e) => warn!("checking the guard's pins at {dir}: {e}"),
        }
        Ok(None)
    }

    /// Follows the listed netns paths; writes the set when it changed, protects the ephemeral
    /// ports of a netns that appeared, holds the sentinels; then says which namespaces are
    /// guarded now (true by then).
    fn refresh_netns(&mut self) {
        let (changed, news) = self.netns.refresh(&mut self.guard, self.cg, &self.scratch);
        if changed {
            self.write_netns();
            self.protect_ephemeral();
        }
        // Every tick: a netns where no sentinel port could be held is tried again.
        self.sync_sentinels();
        for line in news {
            info!("{line}");
        }
    }

    /// The sentinels in every guarded netns; where one took another port than the configured
    /// one, ephemeral protection covers that port too.
    fn sync_sentinels(&mut self) {
        let Some(s) = &mut self.sentinels else { return };
        if s.sync(&self.netns.sentinel_targets(), &mut self.guard.maps) {
            self.protect_ephemeral();
        }
    }

    /// The ports sentinels hold (or may hold), for ephemeral protection.
    fn sentinel_ports(&self) -> std::collections::BTreeSet<u16> {
        self.sentinels
            .as_ref()
            .map(sentinel::Sentinels::ports)
            .unwrap_or_default()
    }

    /// Ephemeral protection in step with the policy, the namespaces and the sentinel ports.
    fn protect_ephemeral(&mut self) {
        if !self.resolved.policy.protect_ephemeral {
            return;
        }
        let ports = self.sentinel_ports();
        if let Err(e) = policy::sync_ephemeral(
            self.pin,
            &mut self.guard,
            &self.resolved.policy,
            self.features,
            &self.netns,
            &ports,
        ) {
            warn!("protecting ephemeral ports in the guarded namespaces: {e:#}");
        }
    }

    /// The guarded set into the kernel, the names into the log, the record for spawn.
    fn write_netns(&mut self) {
        if let Err(e) = self
            .guard
            .maps
            .write_netns(&self.netns.set(), self.netns.scoped())
        {
            error!("writing the guarded network namespaces: {e}");
        }
        self.denials.netns.set(self.netns.names());
        if let Err(e) = self.netns.record(self.pin) {
            warn!("recording the guarded network namespaces for spawn and check: {e}");
        }
    }

    fn repair_ephemeral(&mut self) {
        let ranges =
            policy::protected_ranges(&self.resolved.policy, self.features, &self.sentinel_ports());
        match crate::ephemeral::repair(&ranges) {
            Ok(None) => self.stats.ephemeral_check_failed = false,
            Ok(Some(lost)) => {
                self.stats.ephemeral_check_failed = false;
                self.stats.ephemeral_repairs += 1;
                warn!("net.ipv4.ip_local_reserved_ports lost {lost} (something rewrote it, e.g. `sysctl --system`); put back: the kernel again keeps auto-picked ports out of the reserved ranges");
            }
            Err(e) => {
                self.stats.ephemeral_check_failed = true;
                warn!("checking net.ipv4.ip_local_reserved_ports: {e}");
            }
        }
    }

    /// The record to its file; a failure costs `status` its daemon line, not the guard.
    fn save_record(&self) {
        if let Err(e) = self.record.save(self.pin.path()) {
            warn!("recording the daemon's state for status and reload: {e}");
        }
    }

    /// When the counters of `r`'s ranges started: `fresh` ones now.
    fn record_counters(&self, r: &Resolved, fresh: &[(u16, u16)]) {
        record_counters(self.pin, r, fresh);
    }

    fn update_stats(&mut self) {
        self.stats.leases_reaped = self.reaper.reaped;
        self.stats.denial_lines_summarised = self.denials.lines_summarised;
        self.stats.ephemeral_on = self.resolved.policy.protect_ephemeral;
        self.stats.metrics_evicted = self
            .metrics_evicted
            .load(std::sync::atomic::Ordering::Relaxed);
    }

    /// The metrics listener, if any, on a task of its own: its scrapes come back to the loop,
    /// which owns the maps. The textfile, if any, is said here and written by the tick.
    fn start_metrics(
        &self,
        listener: Option<metrics::Listener>,
    ) -> tokio::sync::mpsc::Receiver<metrics::Scrape> {
        let (scrape_tx, scrapes) = tokio::sync::mpsc::channel::<metrics::Scrape>(16);
        if let Some(listener) = listener {
            info!("metrics on {}", listener.describe());
            tokio::spawn(metrics::serve(
                listener,
                scrape_tx,
                std::sync::Arc::clone(&self.metrics_evicted),
            ));
        } else {
            drop(scrape_tx);
        }
        if let Some(p) = &self.metrics.textfile {
            info!(
                "metrics written to {} every {} s",
                p.display(),
                OUTPUTS_EVERY.as_secs()
            );
        }
        scrapes
    }

    /// A scrape from the listener's task: answered with the text, or not at all when the maps
    /// cannot be read.
    fn answer_scrape(&mut self, reply: metrics::Scrape) {
        if let Some(text) = self.on_scrape() {
            let _ = reply.send(text);
        }
    }

    /// A metrics scrape: the text, or None when the maps cannot be read.
    fn on_scrape(&mut self) -> Option<String> {
        self.update_stats();
        match metrics::render(
            &self.guard.maps,
            self.stats.attached,
            Some(&self.stats),
            None,
        ) {
            Ok(text) => Some(text),
            Err(e) => {
                warn!("rendering metrics: {e:#}");
                None
            }
        }
    }
}

impl<'a> Daemon<'a> {
    #[expect(
        clippy::too_many_arguments,
        reason = "start-up hands over what it made, once"
    )]
    fn new(
        pin: &'a PinDir,
        cg: &'a Cgroup2,
        source: Source<'a>,
        mut guard: Guard,
        resolved: Resolved,
        features: Features,
        netns: netns::GuardedNetns,
        scratch: CgroupPath,
        record: DaemonRecord,
        sentinels: Option<sentinel::Sentinels>,
        metrics: crate::config::MetricsSettings,
    ) -> Result<Daemon<'a>> {
        let offenders = match guard.ebpf.take_map(MAP_BUDGET).map(HashMap::try_from) {
            Some(Ok(budget)) => Some(OffenderMaps {
                budget,
                cgroups: guard
                    .ebpf
                    .take_map(MAP_CGROUP_DENIALS)
                    .and_then(|m| HashMap::try_from(m).ok()),
            }),
            _ => {
                warn!("no {MAP_BUDGET} map: flooding offenders are not summarised");
                None
            }
        };
        let mut d = Daemon {
            pin,
            cg,
            source,
            denials: DenialLog::new(&guard.maps),
            guard,
            resolved,
            features,
            names: CgroupNames::for_daemon(cg),
            metrics,
            metrics_evicted: Default::default(),
            last_outputs: Instant::now(),
            offenders,
            reaper: Reaper::new().context("starting the lease reaper (inotify)")?,
            allow_watch: Inotify::new().context("watching allowed cgroups (inotify)")?,
            stats: DaemonStats {
                attached: true,
                ..DaemonStats::default()
            },
            last_sysctl_check: Instant::now(),
            detached_since: None,
            netns,
            scratch,
            record,
            sentinels,
        };
        d.save_record();
        d.denials.netns.set(d.netns.names());
        // Leases whose VM ended while no daemon ran.
        d.reap(Wake::Full);
        // Allowed cgroups are followed by path: a service's cgroup appears (or is re-created)
        // when the service starts, and is allowed from that instant.
        d.watch_allowed();
        d.refresh_allowed();
        Ok(d)
    }
}

/// Records when the counters of `r`'s ranges started: `fresh` ones now, the others as before.
fn record_counters(pin: &PinDir, r: &Resolved, fresh: &[(u16, u16)]) {
    let ranges: Vec<(u16, u16)> = r
        .policy
        .reserve
        .iter()
        .map(|x| (x.spec.range.first, x.spec.range.last))
        .collect();
    if let Err(e) =
        crate::state::record_counters(pin.path(), &ranges, fresh, crate::leases::now_secs())
    {
        warn!("recording when the counters started: {e}");
    }
}

/// The event loop: every source of work in one `select!`, each answered by a handler of its own.
async fn serve(
    mut d: Daemon<'_>,
    mut signals: Signals,
    metrics_listener: Option<metrics::Listener>,
) -> Result<Exit> {
    let mut scrapes = d.start_metrics(metrics_listener);
    let Watched {
        mut ring,
        mut ebpf_log,
        allow_events,
        inotify,
    } = Watched::register(&mut d)?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));

    let exit = loop {
        tokio::select! {
            ready = ring.readable_mut() => denials_ready(&mut d, ready).await?,
            ready = allow_events.readable() => {
                answer(ready, "waiting for cgroup creation events", || d.on_allowed_cgroups())?;
            }
            ready = inotify.readable() => {
                answer(ready, "waiting for cgroup events", || d.on_cgroup_events())?;
            }
            ready = async { ebpf_log.as_mut().expect("guarded by the if").readable_mut().await }, if ebpf_log.is_some() => {
                ebpf_log_ready(ready)?;
            }
            _ = signals.term.recv() => break stopped_by("SIGTERM"),
            _ = signals.int.recv() => break stopped_by("SIGINT"),
            Some(reply) = scrapes.recv() => d.answer_scrape(reply),
            _ = signals.hup.recv() => d.on_reload(),
            _ = tick.tick() => {
                if let Some(exit) = d.on_tick()? {
                    break exit;
                }
            }
        }
    };
    d.on_exit(&exit, ring.get_mut());
    Ok(exit)
}

/// What aya-log reads the programs' debug records with.
type EbpfLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The file descriptors the loop waits on besides the signals, the scrapes and the tick; each
/// `AsyncFd` owns what it watches, so every fd stays open for as long as it is registered.
struct Watched {
    /// Denial events.
    ring: AsyncFd<RingBuf<MapData>>,
    /// The programs' own debug records (aya-log), when the object has them.
    ebpf_log: Option<AsyncFd<EbpfLogger>>,
    /// A duplicate of the allowed cgroups' inotify fd.
    allow_events: AsyncFd<OwnedFd>,
    /// A duplicate of the lease reaper's inotify fd.
    inotify: AsyncFd<OwnedFd>,
}

impl Watched {
    /// The event ring buffer taken from the object, aya-log started, both inotify fds
    /// duplicated: each registered with the runtime.
    fn register(d: &mut Daemon<'_>) -> Result<Watched> {
        let ring = d
            .guard
            .ebpf
            .take_map(MAP_EVENTS)
            .context("the object has no event ring buffer")?;
        let ring: RingBuf<MapData> = RingBuf::try_from(ring)?;
        // SAFETY: the ring buffer owns its fd, and the AsyncFd owns the ring buffer: the fd stays
        // open for as long as it is registered.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| e.into_parts().1)
            .context("watching the event ring buffer")?;
        let ebpf_log = ebpf_logger(&mut d.guard.ebpf)?;
        // SAFETY: each AsyncFd owns its duplicate of an inotify fd.
        let allow_events = unsafe { AsyncFd::register(d.allow_watch.fd().try_clone()?) }
            .map_err(|e| e.into_parts().1)
            .context("watching allowed cgroups")?;
        let inotify = unsafe { AsyncFd::register(d.reaper.inotify_fd().try_clone()?) }
            .map_err(|e| e.into_parts().1)
            .context("watching cgroup.events")?;
        Ok(Watched {
            ring,
            ebpf_log,
            allow_events,
            inotify,
        })
    }
}

/// The programs' own debug records (aya-log), read for as long as the daemon runs; None (and a
/// warning) when the object has none.
fn ebpf_logger(ebpf: &mut aya::Ebpf) -> Result<Option<AsyncFd<EbpfLogger>>> {
    match EbpfLogger::init(ebpf) {
        // SAFETY: the logger owns its ring buffer fd; the AsyncFd owns the logger.
        Ok(l) => Ok(Some(
            unsafe { AsyncFd::register(l) }
                .map_err(|e| e.into_parts().1)
                .context("watching the aya-log ring buffer")?,
        )),
        Err(e) => {
            warn!("no eBPF log records: {e}");
            Ok(None)
        }
    }
}

/// Denial events are ready: a turn's worth is logged. Readiness is cleared only once the ring
/// buffer is empty, as it wakes the loop on new data only; otherwise the loop yields and the
/// next turn comes.
async fn denials_ready(
    d: &mut Daemon<'_>,
    ready: std::io::Result<AsyncFdReadyMutGuard<'_, RingBuf<MapData>>>,
) -> Result<()> {
    let mut ready = ready.context("waiting for denial events")?;
    if d.on_denials(ready.get_inner_mut()) {
        ready.clear_ready();
    } else {
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// An inotify fd is ready: `handle` reads it whole, then its readiness is cleared.
fn answer(
    ready: std::io::Result<AsyncFdReadyGuard<'_, OwnedFd>>,
    waiting_for: &'static str,
    handle: impl FnOnce(),
) -> Result<()> {
    let mut ready = ready.context(waiting_for)?;
    handle();
    ready.clear_ready();
    Ok(())
}

/// eBPF log records are ready: to the log, all of them.
fn ebpf_log_ready(ready: std::io::Result<AsyncFdReadyMutGuard<'_, EbpfLogger>>) -> Result<()> {
    let mut ready = ready.context("waiting for eBPF log records")?;
    ready.get_inner_mut().flush();
    ready.clear_ready();
    Ok(())
}

/// SIGTERM or SIGINT: said, and the loop ends with the guard in place.
fn stopped_by(signal: &str) -> Exit {
    info!("{signal}: exiting, the guard stays in place");
    Exit::Signal
}
