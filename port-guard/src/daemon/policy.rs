//! The daemon's policy while it runs: where it comes from ([`Source`]), SIGHUP reloads (all or
//! nothing: the maps are rolled back when a write fails), allowed cgroups followed by path, and
//! ephemeral-port protection kept in step.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use log::{error, info, warn};

use super::{netns::GuardedNetns, Daemon};
use crate::{
    cgroup::Cgroup2,
    config::{build_policy, check_cgroups, ConfigFile, Overrides},
    ephemeral::EphemeralError,
    guard::Guard,
    maps::Resolved,
    netns::Netns,
    pin::PinDir,
    policy::{Policy, PortRange},
    probe::Features,
};

/// Everything the daemon needs to (re)build its policy.
pub struct Source<'a> {
    pub config: Option<&'a Path>,
    pub flags: Overrides,
}

/// A reload that took: what it loaded, the policy in force now, and the ranges whose counters
/// started with it.
struct Reloaded {
    loaded: Loaded,
    resolved: Resolved,
    netns: GuardedNetns,
    fresh: Vec<(u16, u16)>,
    /// Namespaces guarded now, to be said once the reload is in force.
    news: Vec<String>,
}

/// A policy as loaded, with where it came from.
pub struct Loaded {
    pub policy: Policy,
    /// The file read (None: no file, the defaults and the flags).
    pub path: Option<PathBuf>,
    /// Flags that override keys of that file.
    pub overrides: Vec<String>,
    /// Allowed cgroups that do not exist yet.
    pub missing: Vec<String>,
    /// Where the metrics go.
    pub metrics: crate::config::MetricsSettings,
    /// [`Loaded::digest_of`] the policy and the metrics settings.
    pub digest: Option<String>,
}

impl Source<'_> {
    pub fn load(&self, cg: &Cgroup2) -> Result<Loaded> {
        let (file, path) = ConfigFile::load(self.config)?;
        let policy = build_policy(&file, path.as_deref(), &self.flags)?;
        let metrics = crate::config::build_metrics(&file, path.as_deref(), &self.flags)?;
        let missing = check_cgroups(&policy, cg)?
            .into_iter()
            .map(|m| m.to_string())
            .collect();
        Ok(Loaded {
            overrides: self.flags.overriding(&file),
            digest: Some(Loaded::digest_of(&policy, &metrics)),
            policy,
            path,
            missing,
            metrics,
        })
    }
}

impl Loaded {
    /// What `status` compares with the file on disk: a digest of everything the file and the
    /// flags decide.
    pub fn digest_of(policy: &Policy, metrics: &crate::config::MetricsSettings) -> String {
        crate::state::digest(&format!("{policy:?}\n{metrics:?}"))
    }

    /// Warnings worth a line at start and at each reload: allowed cgroups that do not exist
    /// yet, flags that override the file, and a policy that allows nothing.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .missing
            .iter()
            .map(|m| {
                format!(
                    "allowed cgroup {m} does not exist yet; it is allowed as soon as it appears"
                )
            })
            .collect();
        if let (Some(path), false) = (&self.path, self.overrides.is_empty()) {
            out.push(format!(
                "flags on the command line override {}: {}",
                path.display(),
                self.overrides.join(", ")
            ));
        }
        if self.policy.reserve.iter().all(|r| r.allow.is_empty()) {
            out.push("no range allows any cgroup: only leases (spawn, lease) may bind the reserved ports; on a libvirt host allow libvirt's cgroups (see contrib/libvirt-host.toml) or its migrations are refused".into());
        }
        out
    }

    /// The ranges as configured, for the daemon's record.
    pub fn configured(&self) -> Vec<crate::state::ConfiguredRange> {
        self.policy
            .reserve
            .iter()
            .map(|r| crate::state::ConfiguredRange {
                ports: r.spec.to_string(),
                first: r.spec.range.first,
                last: r.spec.range.last,
                allow: r.allow.iter().map(ToString::to_string).collect(),
            })
            .collect()
    }
}

/// Runs `f` in each netns ephemeral protection goes to (here, or entered by path), with that
/// netns's path for the record; collects what `f` returned, with the netns's name.
pub(super) fn in_protected<T: Send>(
    guarded: &GuardedNetns,
    f: impl Fn(Option<&Path>) -> Result<T, EphemeralError> + Sync,
) -> Result<Vec<(String, T)>> {
    let mut out = Vec::new();
    for target in guarded.protected() {
        match target {
            None => out.push(("host".to_owned(), f(None)?)),
            Some((name, path)) => {
                let Some(ns) = Netns::open(&path)? else {
                    // Gone since it was seen: the next tick forgets it.
                    continue;
                };
                let value = ns
                    .run(|| f(Some(&path)))
                    .with_context(|| format!("entering netns {}", path.display()))??;
                out.push((name, value));
            }
        }
    }
    Ok(out)
}

/// The ports ephemeral-port protection keeps the kernel from auto-picking: the reserved ranges
/// and, where refusals go through it, the sentinel port (a connect() or bind(0) given it while no
/// sentinel holds it would keep the daemon from taking it back, and post_bind refuses a bind(0)
/// that lands on it).
/// `sentinel_ports` are the ports sentinels took in place of the configured one.
pub(super) fn protected_ranges(
    policy: &Policy,
    features: Features,
    sentinel_ports: &std::collections::BTreeSet<u16>,
) -> Vec<PortRange> {
    let mut ranges: Vec<_> = policy.reserve.iter().map(|r| r.spec.range).collect();
    if features.uses_sentinel(policy) {
        let mut ports = sentinel_ports.clone();
        ports.insert(policy.sentinel_port);
        ranges.extend(ports.into_iter().map(|p| PortRange { first: p, last: p }));
    }
    ranges
}

/// Applies or withdraws ephemeral-port protection to match `policy`, in every netns it goes to,
/// and records it in the config map for `status`.
pub(super) fn sync_ephemeral(
    pin: &PinDir,
    guard: &mut Guard,
    policy: &Policy,
    features: Features,
    guarded: &GuardedNetns,
    sentinel_ports: &std::collections::BTreeSet<u16>,
) -> Result<()> {
    if policy.protect_ephemeral {
        let ranges = protected_ranges(policy, features, sentinel_ports);
        for (name, value) in in_protected(guarded, |path| {
            crate::ephemeral::apply(pin.path(), &ranges, path)
        })? {
            info!("ephemeral ports protected: net.ipv4.ip_local_reserved_ports = {value} (netns {name})");
        }
        guard.maps.set_protect_ephemeral(true)?;
    } else {
        let restored = crate::ephemeral::restore(pin.path(), false)?;
        if !restored.is_empty() {
            guard.maps.set_protect_ephemeral(false)?;
        }
        for line in restored {
            info!("ephemeral-port protection off: {line}");
        }
    }
    Ok(())
}

/// The line a reload that took is logged with: where the config came from, what it decides,
/// and the flags that override it.
fn reloaded_line(loaded: &Loaded, r: &Resolved) -> String {
    format!(
        "SIGHUP: config reloaded from {}: mode={} errno={} netns={} ranges={}{}",
        loaded
            .path
            .as_deref()
            .map_or("(no file: defaults and flags)".into(), |p| p
                .display()
                .to_string()),
        r.policy.mode.name(),
        r.policy.errno.name(),
        r.policy.netns,
        r.policy
            .reserve
            .iter()
            .map(|x| x.spec.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        if loaded.overrides.is_empty() {
            String::new()
        } else {
            format!(
                " (command-line flags override the file: {})",
                loaded.overrides.join(", ")
            )
        }
    )
}

impl Daemon<'_> {
    /// SIGHUP: the new config in force, or the old one, whole. The result goes to the log, to
    /// systemd (STATUS=), to the daemon's record (`status`, `port-guard reload`) and to the
    /// metrics.
    pub(super) fn on_reload(&mut self) {
        crate::notify::notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::notify::monotonic_usec()
        ));
        let result = self.reload();
        let now = crate::leases::now_secs();
        self.record.reloads += 1;
        match result {
            Ok(reloaded) => self.on_reloaded(reloaded, now),
            Err(e) => self.on_reload_refused(&e, now),
        }
        self.save_record();
    }

    /// A reload that took: said, recorded, then in force.
    fn on_reloaded(&mut self, reloaded: Reloaded, now: u64) {
        let Reloaded {
            loaded,
            resolved: r,
            netns,
            fresh,
            news,
        } = reloaded;
        self.stats.reloads_ok += 1;
        for w in loaded.warnings() {
            warn!("{w}");
        }
        info!("{}", reloaded_line(&loaded, &r));
        self.take_metrics_settings(&loaded.metrics);
        self.record_reloaded(&loaded, &r, now);
        self.record_counters(&r, &fresh);
        self.netns = netns;
        self.resolved = r;
        self.watch_allowed();
        self.write_netns();
        self.sync_sentinels();
        for line in news {
            info!("{line}");
        }
        crate::notify::notify(&format!(
            "READY=1\nSTATUS=guard {} on {} (config reloaded)",
            if self.resolved.policy.mode == crate::policy::Mode::Audit {
                "auditing"
            } else {
                "enforcing"
            },
            self.resolved.policy.attach
        ));
    }

    /// The metrics settings of a reload: the textfile follows the config at once; a listener
    /// that moved waits for the next start, and the log says so.
    fn take_metrics_settings(&mut self, new: &crate::config::MetricsSettings) {
        if new.listen != self.metrics.listen {
            warn!("metrics_listen changed (to {}): it takes effect when the daemon starts again; metrics stay on {}", new.listen.as_ref().map_or("none".into(), ToString::to_string), self.metrics.listen.as_ref().map_or("none".into(), ToString::to_string));
        }
        self.metrics.textfile = new.textfile.clone();
    }

    /// The daemon's record after a reload that took: the config in force now, and when.
    fn record_reloaded(&mut self, loaded: &Loaded, r: &Resolved, now: u64) {
        self.record.config_digest = Some(Loaded::digest_of(&r.policy, &self.metrics));
        self.record.config = loaded.path.clone();
        self.record.overrides = loaded.overrides.clone();
        self.record.ranges = loaded.configured();
        self.record.netns = loaded.policy.netns.to_string();
        self.record.last_reload = Some(crate::state::ReloadRecord {
            at: now,
            ok: true,
            error: None,
        });
    }

    /// A reload that was refused: the old config stays in force, and the log, the record and
    /// systemd say why.
    fn on_reload_refused(&mut self, e: &anyhow::Error, now: u64) {
        self.stats.reloads_failed += 1;
        let error = format!("{e:#}");
        error!("SIGHUP: new config refused, the old one stays in force: {error}");
        self.record.last_reload = Some(crate::state::ReloadRecord {
            at: now,
            ok: false,
            error: Some(error.clone()),
        });
        crate::notify::notify(&format!(
            "READY=1\nSTATUS=guard enforcing on {}; last reload REFUSED (old config in force): {}",
            self.resolved.policy.attach,
            error.replace('\n', " ")
        ));
    }

    /// Builds and checks the new policy completely, then updates the maps in place. A failed map
    /// write has restored the old policy in the maps before this returns.
    fn reload(&mut self) -> Result<Reloaded> {
        let cg = self.cg;
        let old = &self.resolved;
        let loaded = self.source.load(cg)?;
        let policy = loaded.policy.clone();
        self.features.check(&policy)?;
        self.check_no_restart_needed(&policy)?;
        let spawn_parent_id = if policy.spawn_parent == old.policy.spawn_parent {
            old.spawn_parent_id
        } else {
            cg.create(&policy.spawn_parent)?
        };
        let r = Resolved::new(policy, cg, spawn_parent_id)?;
        let mut netns = self.netns.clone();
        netns.set_scope(&r.policy.netns);
        let (_, news) = netns.refresh(&mut self.guard, cg, &self.scratch);
        let fresh = self.guard.maps.write_policy(&r, self.features)?;
        let sentinel_ports = self.sentinel_ports();
        let rest = self
            .guard
            .maps
            .write_netns(&netns.set(), netns.scoped())
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                sync_ephemeral(
                    self.pin,
                    &mut self.guard,
                    &r.policy,
                    self.features,
                    &netns,
                    &sentinel_ports,
                )
            });
        if let Err(e) = rest {
            self.restore_old_policy();
            return Err(e);
        }
        Ok(Reloaded {
            loaded,
            resolved: r,
            netns,
            fresh,
            news,
        })
    }

    /// Refuses a policy that only a restart can bring in force: a sentinel port where the daemon
    /// started without one, or another one, or another attach point.
    fn check_no_restart_needed(&self, policy: &Policy) -> Result<()> {
        let old = &self.resolved;
        if self.sentinels.is_none() && self.features.uses_sentinel(policy) {
            bail!(
                "sentinel_port {} needs a daemon started with it: restart the daemon",
                policy.sentinel_port
            );
        }
        if let Some(s) = &self.sentinels {
            if policy.sentinel_port != s.port {
                bail!(
                    "sentinel_port changed from {} to {}: restart the daemon to move the sentinel",
                    s.port,
                    policy.sentinel_port
                );
            }
        }
        if policy.attach != old.policy.attach {
            bail!(
                "attach changed from {} to {}: restart the daemon to move the guard",
                old.policy.attach,
                policy.attach
            );
        }
        Ok(())
    }

    /// After a failed reload the maps hold (part of) the new policy: put the old one back, whole.
    fn restore_old_policy(&mut self) {
        let old = self.resolved.clone();
        if let Err(undo) = self
            .guard
            .maps
            .write_policy(&old, self.features)
            .and_then(|_| {
                self.guard
                    .maps
                    .write_netns(&self.netns.set(), self.netns.scoped())
            })
        {
            error!("restoring the old policy after a failed reload: {undo}");
        }
    }

    /// Watches the nearest existing directory above each allowed cgroup.
    pub(super) fn watch_allowed(&self) {
        let dirs = self
            .resolved
            .policy
            .reserve
            .iter()
            .flat_map(|res| res.allow.iter().map(|p| self.cg.dir(p)));
        self.allow_watch.watch_parents(dirs);
    }

    /// Allowed cgroups are matched by id, and a cgroup that is removed and created again
    /// (systemd restarting libvirtd.service) gets a new one: follow the paths. A path that is
    /// missing for now keeps its last id.
    pub(super) fn refresh_allowed(&mut self) {
        let mut next = self.resolved.clone();
        let mut news = Vec::new();
        for (i, r) in self.resolved.policy.reserve.iter().enumerate() {
            for (j, path) in r.allow.iter().enumerate() {
                if let Ok(id) = self.cg.id(path) {
                    let old = self.resolved.allowed[i][j].0;
                    if id != old {
                        next.allowed[i][j].0 = id;
                        news.push(if old == 0 {
                            format!("allowed cgroup {path} appeared (id {id}); allowed")
                        } else {
                            format!(
                                "allowed cgroup {path} was re-created (id {old} -> {id}); followed"
                            )
                        });
                    }
                }
            }
        }
        if news.is_empty() {
            return;
        }
        match self.guard.maps.write_policy(&next, self.features) {
            Ok(_) => {
                self.resolved = next;
                // Logged once in force.
                news.dedup();
                for n in news {
                    info!("{n}");
                }
            }
            Err(e) => error!("updating allowed cgroups: {e}"),
        }
    }
}
