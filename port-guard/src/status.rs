//! A snapshot of the guard for `status`, read from the pins alone: the settings, the ranges with
//! their allowed cgroups and counters, the leases, and whether the links that are pinned are the
//! ones attached.

use std::{fs::File, os::fd::AsFd as _, path::PathBuf};

use port_guard_common::PROG_BIND4;

use crate::{
    cgroup::{Cgroup2, CgroupNames},
    guard::GuardError,
    leases::now_secs,
    maps::{Counters, Maps},
    pin::{PinDir, LINKS},
    state::{DaemonRecord, ReloadRecord},
    sys,
};

/// Everything `status` shows.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    /// Both links are pinned and attached to the attach cgroup.
    pub attached: bool,
    /// Each hook's link: pinned, attached, and to what.
    pub links: Vec<LinkStatus>,
    /// Where the pins and the attached programs disagree, one sentence each (empty when they
    /// agree).
    pub disagreements: Vec<String>,
    pub attach: String,
    pub mode: &'static str,
    pub errno: &'static str,
    /// What refused binds really get on this kernel.
    pub effective_errno: &'static str,
    /// The kernel sets a refused bind's errno itself (bpf_set_retval, 6.1+).
    pub kernel_sets_errno: bool,
    pub protect_ephemeral: bool,
    pub spawn_parent: String,
    pub reserve: Vec<RangeStatus>,
    pub leases: Vec<LeaseStatus>,
    /// The same leases grouped by cgroup.
    pub lessees: Vec<Lessee>,
    pub counters: Counters,
    /// Denials counted but not reported (the event ring buffer was full).
    pub events_lost: u64,
    /// Leases ended since the guard was first loaded, by how (`released`, `cgroup_removed`,
    /// `emptied`, `expired`).
    pub leases_ended: std::collections::BTreeMap<&'static str, u64>,
    /// Where the guard enforces.
    pub netns: NetnsStatus,
    /// The daemon of this pin dir, as it recorded itself.
    pub daemon: DaemonStatus,
    /// Where refusals go through the sentinel port (None: the kernel sets the errno itself).
    pub sentinel: Option<SentinelStatus>,
    /// Why the config on disk is not the one in force (None: it is, or no daemon runs).
    pub config_drift: Option<String>,
}

/// Whether the config file the running daemon read (`--config` names another) is the policy in
/// force: it is read again, merged with the daemon's flags, and compared with what the daemon
/// recorded it loaded (`record`, as [`Recorded`] read it). None when it is, or when no
/// daemon runs (nothing is "in force" but the pins, which `status` shows).
pub fn config_drift(
    record: Option<&DaemonRecord>,
    config: Option<&std::path::Path>,
    s: &Status,
) -> Option<String> {
    if !s.daemon.running {
        return None;
    }
    let record = record?;
    let in_force = record.config_digest.as_deref()?;
    let path = config.map(ToOwned::to_owned).or(record.config.clone());
    let shown = path
        .as_deref()
        .map_or("the defaults (no config file)".into(), |p| {
            p.display().to_string()
        });
    let built = crate::config::ConfigFile::load(path.as_deref())
        .map_err(|e| e.to_string())
        .and_then(|(file, p)| {
            let policy = crate::config::build_policy(&file, p.as_deref(), &record.flags)
                .map_err(|e| e.to_string())?;
            let metrics = crate::config::build_metrics(&file, p.as_deref(), &record.flags)
                .map_err(|e| e.to_string())?;
            Ok(crate::daemon::Loaded::digest_of(&policy, &metrics))
        });
    match built {
        Ok(d) if d == in_force => None,
        Ok(_) => Some(format!(
            "{shown} differs from the config in force (edited since the daemon read it): `port-guard check --config {shown}` shows what a reload would change, `systemctl reload port-guard` applies it"
        )),
        Err(e) => Some(format!(
            "{shown} cannot be used as it is ({e}): a reload would be refused and the config in force stays"
        )),
    }
}

#[derive(Debug, serde::Serialize)]
pub struct SentinelStatus {
    /// The port sentinels hold (the configured one where they could); 0 when no netns has a
    /// sentinel now.
    pub port: u32,
    /// The network namespaces where a sentinel holds its port: refused binds there get
    /// EADDRINUSE, elsewhere EPERM.
    pub held_in: Vec<String>,
    /// Each of them with the port its sentinel holds (another than the configured one where a
    /// socket held that first).
    pub ports: Vec<SentinelPort>,
}

#[derive(Debug, serde::Serialize)]
pub struct SentinelPort {
    pub netns: String,
    pub port: u16,
}

/// Where sentinels hold their port, from `PG_SENT_NETNS` (absent in pins of an older daemon).
fn sentinel_status(maps: &Maps, netns_name: impl Fn(u64) -> String) -> SentinelStatus {
    let mut ports: Vec<SentinelPort> = maps
        .sentinel_netns_ports_by_cookie()
        .into_iter()
        .map(|(cookie, port)| SentinelPort {
            netns: netns_name(cookie),
            port,
        })
        .collect();
    ports.sort_by(|a, b| a.netns.cmp(&b.netns));
    // The port most of them hold, for the one-line summary.
    let mut counts: std::collections::BTreeMap<u16, usize> = std::collections::BTreeMap::new();
    for p in &ports {
        *counts.entry(p.port).or_default() += 1;
    }
    let port = counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or(0, |(p, _)| u32::from(*p));
    SentinelStatus {
        port,
        held_in: ports.iter().map(|p| p.netns.clone()).collect(),
        ports,
    }
}

#[derive(Debug, serde::Serialize)]
pub struct DaemonStatus {
    /// A daemon runs: its record names a live process.
    pub running: bool,
    /// Whether any daemon of this pin dir ran since boot (the record is on a tmpfs).
    pub recorded: bool,
    pub pid: Option<u32>,
    /// Unix seconds at which it started.
    pub started: Option<u64>,
    /// Unix seconds at which it exited cleanly (not set when it was killed).
    pub stopped: Option<u64>,
    pub config: Option<PathBuf>,
    /// Command-line flags that override keys of the config file.
    pub overrides: Vec<String>,
    /// The configured network namespaces (empty when not recorded).
    pub netns: String,
    pub reloads: u64,
    pub last_reload: Option<ReloadRecord>,
    /// The record could not be read (a damaged or untrusted file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DaemonStatus {
    fn from_record(loaded: &Result<Option<DaemonRecord>, crate::error::IoError>) -> DaemonStatus {
        let (record, error) = match loaded {
            Ok(r) => (r.clone(), None),
            Err(e) => (None, Some(e.to_string())),
        };
        DaemonStatus {
            running: record.as_ref().is_some_and(DaemonRecord::running),
            recorded: record.is_some(),
            pid: record.as_ref().map(|r| r.pid),
            started: record.as_ref().map(|r| r.started),
            stopped: record.as_ref().and_then(|r| r.stopped),
            config: record.as_ref().and_then(|r| r.config.clone()),
            overrides: record
                .as_ref()
                .map(|r| r.overrides.clone())
                .unwrap_or_default(),
            netns: record.as_ref().map(|r| r.netns.clone()).unwrap_or_default(),
            reloads: record.as_ref().map_or(0, |r| r.reloads),
            last_reload: record.and_then(|r| r.last_reload),
            error,
        }
    }
}

/// An allowed cgroup as configured, and where it stands.
#[derive(Debug, serde::Serialize)]
pub struct AllowedCgroup {
    pub path: String,
    /// "allowed" (it exists and the guard allows it), "not present" (it does not exist yet: it
    /// is allowed as soon as it appears, while a daemon runs), "present, not allowed" (it exists
    /// but the guard holds no or another id for it: no daemon followed it), or "unknown: why".
    pub state: String,
}

#[derive(Debug, serde::Serialize)]
pub struct NetnsStatus {
    /// Only in the `guarded` namespaces (else in every netns).
    pub scoped: bool,
    pub guarded: Vec<GuardedNetns>,
    /// Binds of reserved ports let through because their netns is not guarded.
    pub unguarded_binds: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct GuardedNetns {
    pub name: String,
    pub inode: u64,
    pub cookie: u64,
}

/// What the agent keeps about a pin dir beside the pins (its files under
/// [`crate::state::STATE_DIR`]), read once: the daemon's record, when each range's counters
/// started, and the names of the namespaces it guards.
pub struct Recorded {
    /// The daemon's record (None: no daemon ran since boot; an error: a damaged or untrusted file).
    pub daemon: Result<Option<DaemonRecord>, crate::error::IoError>,
    counters_since: std::collections::BTreeMap<(u16, u16), u64>,
    netns_names: std::collections::HashMap<u64, String>,
}

impl Recorded {
    pub fn read(pin: &PinDir) -> Recorded {
        Recorded {
            daemon: DaemonRecord::load(pin.path()),
            counters_since: crate::state::counters_since(pin.path()),
            netns_names: recorded_netns_names(pin),
        }
    }

    /// The daemon's record, where there is one that could be read.
    pub fn daemon(&self) -> Option<&DaemonRecord> {
        self.daemon.as_ref().ok().and_then(Option::as_ref)
    }
}

/// Names of guarded namespaces as the daemon recorded them: inode → name.
fn recorded_netns_names(pin: &PinDir) -> std::collections::HashMap<u64, String> {
    std::fs::read_to_string(crate::state::path(pin.path(), "netns"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let inode = it.next()?.parse().ok()?;
            let _path = it.next()?;
            Some((inode, it.next()?.to_owned()))
        })
        .collect()
}

#[derive(Debug, serde::Serialize)]
pub struct LinkStatus {
    pub hook: &'static str,
    pub pinned: bool,
    /// The pinned link is attached (to `cgroup_id`).
    pub attached: bool,
    pub cgroup_id: u64,
    pub prog_id: u32,
}

#[derive(Debug, serde::Serialize)]
pub struct RangeStatus {
    pub ports: String,
    pub first: u16,
    pub last: u16,
    pub protocols: Vec<&'static str>,
    pub allow: Vec<String>,
    /// The allowed cgroups as the daemon's config names them, present or not (empty when no
    /// daemon recorded this range).
    pub allow_configured: Vec<AllowedCgroup>,
    pub counters: Counters,
    /// Unix seconds since which the counters count (None: not recorded).
    pub counters_since: Option<u64>,
    pub tcp: Counters,
    pub udp: Counters,
    /// Binds let through because their netns is not guarded.
    pub unguarded: u64,
    /// The most sockets on the range one child of an allowed cgroup may hold (0: no limit).
    pub per_child_limit: u32,
    /// The units holding sockets on the range now (limited ranges only), most first.
    pub shares: Vec<ShareStatus>,
}

/// One unit's share of a limited range.
#[derive(Debug, serde::Serialize)]
pub struct ShareStatus {
    pub unit: String,
    pub unit_id: u64,
    pub held: u64,
    pub limit: u32,
}

#[derive(Debug, serde::Serialize)]
pub struct LeaseStatus {
    pub port: u32,
    pub cgroup: String,
    pub cgroup_id: u64,
    pub since: u64,
    pub age_secs: u64,
    /// Whether a range covers the port: a lease on a port no range covers is not enforced (a
    /// reload took the port out of the ranges).
    pub in_range: bool,
    /// It also ends when its cgroup, once populated, empties (spawn, `--until-empty`).
    pub until_empty: bool,
    /// Seconds until its TTL runs out (0: due now), or None: no TTL.
    pub expires_in_secs: Option<u64>,
}

/// The leases of one cgroup, for the grouped view.
#[derive(Debug, serde::Serialize)]
pub struct Lessee {
    pub cgroup: String,
    pub ports: Vec<u32>,
    /// Of the oldest lease.
    pub age_secs: u64,
    /// The soonest expiry among them, if any has a TTL.
    pub expires_in_secs: Option<u64>,
    pub until_empty: bool,
}

/// Groups `leases` by cgroup, in the order of their first port.
pub fn lessees(leases: &[LeaseStatus]) -> Vec<Lessee> {
    let mut out: Vec<Lessee> = Vec::new();
    for l in leases {
        match out.iter_mut().find(|g| g.cgroup == l.cgroup) {
            Some(g) => {
                g.ports.push(l.port);
                g.age_secs = g.age_secs.max(l.age_secs);
                g.expires_in_secs = match (g.expires_in_secs, l.expires_in_secs) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                g.until_empty |= l.until_empty;
            }
            None => out.push(Lessee {
                cgroup: l.cgroup.clone(),
                ports: vec![l.port],
                age_secs: l.age_secs,
                expires_in_secs: l.expires_in_secs,
                until_empty: l.until_empty,
            }),
        }
    }
    out
}

/// The two links as pinned, and what the attach cgroup really runs, compared.
fn links(
    pin: &PinDir,
    cg: &Cgroup2,
    names: &mut CgroupNames<'_>,
    attach_id: u64,
) -> (Vec<LinkStatus>, Vec<String>) {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let mut pinned_progs = Vec::new();
    for ((_, link_name), hook) in LINKS.iter().zip(["bind4", "bind6"]) {
        let path = pin.file(link_name);
        let state = sys::obj_get(&path).and_then(|fd| sys::link_state(fd.as_fd()));
        let (pinned, st) = match state {
            Ok(st) => (true, Some(st)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (false, None),
            Err(e) => {
                notes.push(format!(
                    "{hook}: cannot read the pinned link {}: {e}",
                    path.display()
                ));
                (true, None)
            }
        };
        let attached = st.is_some_and(|s| s.cgroup_id != 0);
        if pinned && st.is_some() && !attached {
            notes.push(format!("{hook}: the pinned link is detached: binds are not checked (restart the daemon to attach again)"));
        }
        if let Some(s) = st.filter(|s| s.cgroup_id != 0 && s.cgroup_id != attach_id) {
            notes.push(format!(
                "{hook}: the pinned link is attached to {}, not to the attach cgroup",
                names.name(s.cgroup_id)
            ));
        }
        if !pinned {
            notes.push(format!("{hook}: no link is pinned at {}", path.display()));
        }
        if let Some(s) = st {
            pinned_progs.push(s.prog_id);
        }
        out.push(LinkStatus {
            hook,
            pinned,
            attached,
            cgroup_id: st.map_or(0, |s| s.cgroup_id),
            prog_id: st.map_or(0, |s| s.prog_id),
        });
    }
    notes.extend(unpinned(cg, names, attach_id, &pinned_progs));
    (out, notes)
}

/// Guard programs attached to the attach cgroup that no pin holds (a daemon that holds its links
/// by fd only, its pins removed, or an older guard's): a note per hook that has any.
fn unpinned(
    cg: &Cgroup2,
    names: &mut CgroupNames<'_>,
    attach_id: u64,
    pinned_progs: &[u32],
) -> Vec<String> {
    let mut notes = Vec::new();
    let Some(Ok(attach)) = names
        .lookup(attach_id)
        .ok()
        .flatten()
        .map(|p| File::open(cg.dir(&p)))
    else {
        return notes;
    };
    for (hook, attach_type) in [
        ("bind4", sys::ATTACH_INET4_BIND),
        ("bind6", sys::ATTACH_INET6_BIND),
    ] {
        let Ok(ids) = sys::cgroup_prog_ids(attach.as_fd(), attach_type) else {
            continue;
        };
        let unpinned = ids
            .iter()
            .filter(|id| !pinned_progs.contains(id))
            // The kernel keeps 15 bytes of a name: both programs are "port_guard_bind".
            .filter(|id| sys::prog_name(**id).is_ok_and(|n| n == PROG_BIND4[..15]))
            .count();
        if unpinned > 0 {
            notes.push(format!("{hook}: {unpinned} guard program(s) attached to the attach cgroup without a pin (held by a running daemon, which pins them again)"));
        }
    }
    notes
}

/// Everything `status` shows, from the maps and the agent's files already read (each once, by
/// the caller, which may use them too) and the links pinned beside the maps.
pub fn status_of(
    pin: &PinDir,
    cg: &Cgroup2,
    maps: &Maps,
    recorded: &Recorded,
) -> Result<Status, GuardError> {
    let settings = maps.settings()?;
    let mut names = CgroupNames::new(cg);
    let daemon = DaemonStatus::from_record(&recorded.daemon);
    let reserve = ranges(
        cg,
        maps,
        recorded.daemon(),
        &recorded.counters_since,
        &mut names,
    )?;
    let mut total = Counters::default();
    for r in &reserve {
        total += r.counters;
    }
    let unguarded_total = reserve.iter().map(|r| r.unguarded).sum();
    let leases = lease_status(maps, &reserve, &mut names)?;
    let (links, disagreements) = links(pin, cg, &mut names, settings.attach_id);
    Ok(Status {
        pin_dir: pin.path().to_owned(),
        attached: links
            .iter()
            .all(|l| l.attached && l.cgroup_id == settings.attach_id),
        links,
        disagreements,
        attach: names.name(settings.attach_id),
        mode: settings.mode.name(),
        errno: settings.errno.name(),
        effective_errno: settings.effective_errno().name(),
        kernel_sets_errno: settings.retval,
        protect_ephemeral: settings.protect_ephemeral,
        spawn_parent: if settings.spawn_parent_id == 0 {
            String::new()
        } else {
            names.name(settings.spawn_parent_id)
        },
        reserve,
        lessees: lessees(&leases),
        leases,
        counters: total,
        events_lost: maps.events_lost()?,
        leases_ended: crate::leases::Ended::ALL
            .iter()
            .map(|e| e.label())
            .zip(maps.leases().ended())
            .collect(),
        sentinel: settings
            .sentinel
            .then(|| sentinels(maps, &recorded.netns_names)),
        config_drift: None,
        netns: NetnsStatus {
            scoped: settings.netns_scoped,
            guarded: guarded_netns(maps, &recorded.netns_names)?,
            unguarded_binds: unguarded_total,
        },
        daemon,
    })
}

/// Each configured range: its allowed cgroups (in force and as configured), counters and shares.
fn ranges(
    cg: &Cgroup2,
    maps: &Maps,
    record: Option<&DaemonRecord>,
    since: &std::collections::BTreeMap<(u16, u16), u64>,
    names: &mut CgroupNames<'_>,
) -> Result<Vec<RangeStatus>, GuardError> {
    let allowed = maps.allowed()?;
    let limits = maps.limits()?;
    let shares = crate::maps::by_slot(&maps.shares()?);
    let mut reserve = Vec::new();
    for r in maps.ranges() {
        let ids: Vec<u64> = allowed
            .iter()
            .filter(|(_, mask)| *mask & r.bit() != 0)
            .map(|(id, _)| *id)
            .collect();
        let mut allow: Vec<String> = ids.iter().map(|id| names.name(*id)).collect();
        allow.sort();
        let configured = record
            .and_then(|rec| {
                rec.ranges
                    .iter()
                    .find(|c| c.first == r.spec.range.first && c.last == r.spec.range.last)
            })
            .map(|c| c.allow.clone())
            .unwrap_or_default();
        let allow_configured = configured
            .into_iter()
            .map(|path| AllowedCgroup {
                state: allowed_state(cg, &path, &ids),
                path,
            })
            .collect();
        let c = maps.counters(r.slot)?;
        let (ut, uu) = maps.unguarded(r.slot)?;
        let limit = limits[r.slot as usize];
        reserve.push(RangeStatus {
            ports: r.spec.range.to_string(),
            first: r.spec.range.first,
            last: r.spec.range.last,
            protocols: r.spec.protocols.names(),
            allow,
            allow_configured,
            counters: c.total(),
            counters_since: since.get(&(r.spec.range.first, r.spec.range.last)).copied(),
            tcp: c.tcp,
            udp: c.udp,
            unguarded: ut + uu,
            per_child_limit: limit,
            shares: shares
                .get(&r.slot)
                .into_iter()
                .flatten()
                .map(|&(unit, held)| ShareStatus {
                    unit: names.name(unit),
                    unit_id: unit,
                    held,
                    limit,
                })
                .collect(),
        });
    }
    Ok(reserve)
}

/// Every lease, named, and whether a range still covers its port.
fn lease_status(
    maps: &Maps,
    reserve: &[RangeStatus],
    names: &mut CgroupNames<'_>,
) -> Result<Vec<LeaseStatus>, GuardError> {
    let now = now_secs();
    let boot = crate::leases::now_boot_secs();
    let covered = |port: u16| reserve.iter().any(|r| r.first <= port && port <= r.last);
    Ok(maps
        .leases()
        .all()
        .map_err(crate::maps::MapsError::from)?
        .into_iter()
        .map(|(port, l)| LeaseStatus {
            port: port.into(),
            cgroup: names.name(l.cgroup_id),
            cgroup_id: l.cgroup_id,
            since: l.since,
            age_secs: now.saturating_sub(l.since),
            in_range: covered(port),
            until_empty: l.flags & port_guard_common::LEASE_UNTIL_EMPTY != 0,
            expires_in_secs: (l.expires != 0).then(|| l.expires.saturating_sub(boot)),
        })
        .collect())
}

/// Where sentinels hold their port, named.
fn sentinels(maps: &Maps, recorded: &std::collections::HashMap<u64, String>) -> SentinelStatus {
    let guarded = maps.guarded_netns().unwrap_or_default();
    sentinel_status(maps, |cookie| {
        guarded
            .get(&cookie)
            .map(|inode| {
                recorded
                    .get(inode)
                    .cloned()
                    .unwrap_or_else(|| inode.to_string())
            })
            .unwrap_or_else(|| format!("netns cookie {cookie}"))
    })
}

/// The guarded namespaces, named as the daemon recorded them (else by `ip netns`, else inode).
fn guarded_netns(
    maps: &Maps,
    recorded: &std::collections::HashMap<u64, String>,
) -> Result<Vec<GuardedNetns>, GuardError> {
    Ok(maps
        .guarded_netns()?
        .into_iter()
        .map(|(cookie, inode)| GuardedNetns {
            name: recorded
                .get(&inode)
                .cloned()
                .or_else(|| crate::netns::run_netns_name(inode))
                .unwrap_or_else(|| inode.to_string()),
            inode,
            cookie,
        })
        .collect())
}

/// Where a configured allowed cgroup stands against the ids the guard allows.
fn allowed_state(cg: &Cgroup2, path: &str, ids: &[u64]) -> String {
    let parsed: crate::cgroup::CgroupPath = match path.parse() {
        Ok(p) => p,
        Err(e) => return format!("unknown: {e}"),
    };
    match cg.id(&parsed) {
        Ok(id) if ids.contains(&id) => "allowed".into(),
        Ok(_) => "present, not allowed".into(),
        Err(crate::cgroup::CgroupError::Missing { .. }) => "not present".into(),
        Err(e) => format!("unknown: {e}"),
    }
}
