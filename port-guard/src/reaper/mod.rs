//! Ending leases whose cgroup is gone or has emptied.
//!
//! A lease to a cgroup that `spawn` made (directly below the spawn parent) ends when that cgroup
//! has no process left: spawn moved itself in before it claimed, so empty means the VM exited.
//! The lease and the cgroup are removed. A lease to any other cgroup (`lease --cgroup`, where
//! the orchestrator starts qemu after leasing) ends when its cgroup is removed, or when the
//! daemon has seen it populated and then empty.
//!
//! The work is proportional to what changed, not to the number of leases:
//! - inotify on each leased cgroup's `cgroup.events` (and on every cgroup made below the spawn
//!   parent, from its creation) says which cgroup to look at when a VM exits;
//! - the lease map is read (in batches) only when the allocators' generation counter moved, once
//!   a second at most, and only cgroups that gained a lease are looked at then;
//! - every [`FULL_PASS`] (and when inotify overflows) every lessee cgroup is looked at and the
//!   leased-port bitmap is reconciled with the lease map, as a safety net.
//!
//! A lease ends only on evidence: the cgroup is gone (ENOENT, a stale handle) or it is empty.
//! Any other failure to look (out of file descriptors, a permission error) keeps the lease and
//! the cgroup is looked at again on the next tick.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    time::{Duration, Instant},
};

use log::{info, warn};
use port_guard_common::{Lease, LEASE_UNTIL_EMPTY};

mod watcher;

use self::watcher::Watcher;
use crate::{
    cgroup::{Cgroup2, CgroupError, CgroupNames, CgroupPath},
    error::IoError,
    leases::{self, Ended, LeaseError},
    logfmt,
    maps::Maps,
};

/// How often every lessee cgroup is looked at even when nothing was heard.
pub const FULL_PASS: Duration = Duration::from_secs(30);

/// A lease-less, empty cgroup below the spawn parent this old was abandoned by its maker.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(60);

/// What woke the reaper.
pub enum Wake {
    /// The daemon's one-second tick: the lease map is read if it changed, and everything is
    /// looked at when [`FULL_PASS`] has elapsed.
    Tick,
    /// inotify events are pending.
    Inotify,
    /// Look at everything now (start-up).
    Full,
}

/// Lease bookkeeping across passes.
pub struct Reaper {
    watcher: Watcher,
    /// Lessee cgroups seen with processes in them.
    seen_populated: HashSet<u64>,
    pub reaped: u64,
    /// The lease map as last read, by lessee cgroup: id → ports.
    by_cgroup: HashMap<u64, Vec<u16>>,
    /// The lease map as last read: each lease's terms (until-empty, expiry).
    snapshot: BTreeMap<u16, Lease>,
    /// The earliest expiry in the snapshot (CLOCK_BOOTTIME seconds), if any lease has a TTL.
    next_expiry: Option<u64>,
    /// The allocators' generation when the lease map was last read.
    generation: Option<u64>,
    last_full: Option<Instant>,
    /// Lessee cgroups inotify could not watch (watch limit): looked at on every tick.
    unwatched: HashSet<u64>,
    /// Lessee cgroups that could not be looked at (an error, not evidence): every tick too.
    failing: HashSet<u64>,
}

fn group(leases: &BTreeMap<u16, Lease>) -> HashMap<u64, Vec<u16>> {
    let mut by: HashMap<u64, Vec<u16>> = HashMap::new();
    for (port, lease) in leases {
        by.entry(lease.cgroup_id).or_default().push(*port);
    }
    by
}

/// What looking at a lessee cgroup found.
enum Seen {
    /// It exists at this path.
    At(CgroupPath),
    /// It is gone: no cgroup has its id any more.
    Gone,
}

/// Finds the cgroup `id`, or says why that cannot be told now.
fn find(cg: &Cgroup2, names: &mut CgroupNames<'_>, id: u64) -> Result<Seen, IoError> {
    // Twice at most: a cached path that no longer holds `id` (the cgroup was renamed, or removed
    // and another made with its name) is forgotten and `id` looked up afresh.
    for _ in 0..2 {
        let Some(path) = names.lookup(id)? else {
            return Ok(Seen::Gone);
        };
        match cg.id(&path) {
            Ok(now) if now == id => return Ok(Seen::At(path)),
            Ok(_) | Err(CgroupError::Missing { .. }) => names.forget(id),
            Err(CgroupError::Io(e)) => return Err(e),
            Err(e) => {
                return Err(IoError::new(
                    "stat",
                    cg.dir(&path),
                    std::io::Error::other(e.to_string()),
                ))
            }
        }
    }
    // Found by handle at a path that then held another cgroup: it moved as we looked.
    Err(IoError::new(
        "find cgroup",
        cg.mount(),
        std::io::Error::other(format!("cgroup id {id} moved while it was looked up")),
    ))
}

impl Reaper {
    /// The inotify instance the daemon waits on.
    pub fn inotify_fd(&self) -> &std::os::fd::OwnedFd {
        self.watcher.inotify.fd()
    }

    pub fn new() -> io::Result<Reaper> {
        Ok(Reaper {
            watcher: Watcher::new()?,
            seen_populated: HashSet::new(),
            reaped: 0,
            by_cgroup: HashMap::new(),
            snapshot: BTreeMap::new(),
            next_expiry: None,
            generation: None,
            last_full: None,
            unwatched: HashSet::new(),
            failing: HashSet::new(),
        })
    }

    /// One pass: reads what woke it, looks at the cgroups that may have changed, ends the
    /// leases of those that are gone or emptied.
    pub fn run(
        &mut self,
        wake: Wake,
        maps: &mut Maps,
        cg: &Cgroup2,
        names: &mut CgroupNames<'_>,
        spawn_parent: Option<&CgroupPath>,
    ) {
        let mut full =
            matches!(wake, Wake::Full) || self.last_full.is_none_or(|t| t.elapsed() >= FULL_PASS);
        // Cgroups to look at, and spawn-parent children to start watching.
        let mut check: HashSet<u64> = HashSet::new();
        if matches!(wake, Wake::Inotify) {
            for ev in self.watcher.inotify.read_events() {
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    full = true;
                } else if let Some(id) = self.watcher.cgroup_of(&ev) {
                    check.insert(id);
                } else if Some(ev.wd) == self.watcher.dir_watch && ev.mask & libc::IN_CREATE != 0 {
                    // A cgroup made below the spawn parent: watch it from now on, so a VM
                    // that lives for less than a tick is still seen to exit.
                    if let (Some(sp), Some(name)) = (spawn_parent, ev.name.as_ref()) {
                        self.watch_child(cg, sp, name);
                    }
                }
            }
        }
        // The lease map, when an allocator changed it (or on a full pass).
        let generation = maps.leases().generation();
        if full || self.generation != Some(generation) {
            let leases = match maps.leases().all() {
                Ok(l) => l,
                Err(e) => {
                    warn!("reading leases: {e}");
                    return;
                }
            };
            self.generation = Some(generation);
            self.next_expiry = leases
                .values()
                .filter(|l| l.expires != 0)
                .map(|l| l.expires)
                .min();
            let by = group(&leases);
            // Cgroups that gained a lease since the last read.
            check.extend(by.keys().filter(|id| !self.by_cgroup.contains_key(id)));
            // Cgroups that lost every lease: no longer ours to watch (spawned ones stay watched
            // until they are removed).
            for id in self.by_cgroup.keys().filter(|id| !by.contains_key(id)) {
                check.insert(*id);
            }
            self.by_cgroup = by;
            if full {
                let (cleared, set) = maps.leases().reconcile(&leases);
                if cleared + set > 0 {
                    info!("leased-port bitmap reconciled with the lease map: {cleared} stale marks cleared, {set} marks added");
                }
            }
            self.snapshot = leases;
        }
        self.expire(maps, cg, names);
        if matches!(wake, Wake::Tick) {
            check.extend(self.unwatched.iter().copied());
            check.extend(self.failing.iter().copied());
        }
        if full {
            check.extend(self.by_cgroup.keys().copied());
            check.extend(self.watcher.by_id.keys().copied());
            if let Some(sp) = spawn_parent {
                self.watcher.watch_dir(cg, sp);
                if let Ok(entries) = fs::read_dir(cg.dir(sp)) {
                    for entry in entries.flatten() {
                        let name = entry.file_name();
                        if !self.remove_if_abandoned(cg, sp, &name) {
                            self.watch_child(cg, sp, &name);
                        }
                    }
                }
            }
            self.watcher.prune_parents();
            self.last_full = Some(Instant::now());
        }
        for id in check {
            self.check(id, maps, cg, names, spawn_parent);
        }
    }

    /// Looks at one cgroup: ends its leases when it is gone or emptied, keeps it watched while
    /// it lives. When it cannot be looked at, nothing ends: it is looked at again next tick.
    fn check(
        &mut self,
        id: u64,
        maps: &mut Maps,
        cg: &Cgroup2,
        names: &mut CgroupNames<'_>,
        spawn_parent: Option<&CgroupPath>,
    ) {
        let seen = match find(cg, names, id) {
            Ok(seen) => seen,
            Err(e) => {
                self.retry(id, &e);
                return;
            }
        };
        let path = match &seen {
            Seen::At(p) => Some(p.clone()),
            Seen::Gone => None,
        };
        let spawned = match (&path, spawn_parent) {
            (Some(p), Some(sp)) => leases::is_spawned(p, sp),
            _ => false,
        };
        let ports = self.by_cgroup.get(&id).cloned().unwrap_or_default();
        if ports.is_empty() {
            // No lease (yet: spawn makes its cgroup before it claims): nothing to end. A cgroup
            // made by spawn stays watched for its claim and its exit.
            match &path {
                Some(p) if spawned => self.watch(cg, p, id),
                _ => self.forget(id),
            }
            return;
        }
        let removed = (Ended::Removed, "its cgroup was removed".to_owned());
        let reason = match &path {
            None => Some(removed),
            Some(p) => match cg.populated(p) {
                Ok(None) => Some(removed),
                Ok(Some(true)) => {
                    self.seen_populated.insert(id);
                    None
                }
                // Empty now: which leases that ends is decided per lease below.
                Ok(Some(false)) => Some((Ended::Emptied, format!("{p} has no process left"))),
                Err(e) => {
                    self.retry(id, &e);
                    return;
                }
            },
        };
        self.unretried(id);
        let Some((how, why)) = reason else {
            // Alive: watched while it holds a lease.
            if let Some(p) = &path {
                self.watch(cg, p, id);
            }
            return;
        };
        // An empty cgroup ends only the leases that end that way, once a process was there: a
        // spawn lease (spawn moves itself in before it claims), and an until-empty one whose
        // cgroup was seen populated or has used CPU time since the lease was made (a process
        // that came and went between two looks). The others stay, and the cgroup stays watched.
        let usage = match (&path, how) {
            (Some(p), Ended::Emptied) if !spawned => cg.cpu_usec(p).ok(),
            _ => None,
        };
        let seen = self.seen_populated.contains(&id);
        let (ports, staying): (Vec<u16>, Vec<u16>) = ports.into_iter().partition(|port| {
            how != Ended::Emptied
                || spawned
                || self.snapshot.get(port).is_some_and(|l| {
                    l.flags & LEASE_UNTIL_EMPTY != 0
                        && (seen || usage.is_some_and(|u| l.cpu_usec != u64::MAX && u > l.cpu_usec))
                })
        });
        if ports.is_empty() {
            if let Some(p) = &path {
                self.watch(cg, p, id);
            }
            return;
        }
        let mut ended = Vec::new();
        let who = path
            .as_ref()
            .map(|p| logfmt::value(p.as_str()).into_owned())
            .unwrap_or(format!("(id {id})"));
        for port in ports {
            // The lease may have changed hands since it was read (`lease` hands a port from
            // its scratch cgroup to the target, then removes the scratch cgroup): end it only
            // if it is still this cgroup's.
            match maps.leases_mut().release_if_held_by(port, id) {
                Ok(true) => {
                    self.reaped += 1;
                    maps.leases().count_end(how);
                    ended.push(port);
                    info!("lease ended: port={port} cgroup={who} ({why})");
                }
                Ok(false) => ended.push(port),
                Err(LeaseError::NotLeased(_)) => ended.push(port),
                Err(e) => warn!("ending lease of port {port}: {e}"),
            }
        }
        if let Some(left) = self.by_cgroup.get_mut(&id) {
            left.retain(|p| !ended.contains(p));
            if left.is_empty() {
                self.by_cgroup.remove(&id);
            }
        }
        if let (Some(p), true) = (&path, spawned) {
            match fs::remove_dir(cg.dir(p)) {
                Ok(()) => info!("removed cgroup {}", logfmt::value(p.as_str())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!("removing cgroup {}: {e}", logfmt::value(p.as_str())),
            }
        }
        if path.is_none() || spawned || !self.by_cgroup.contains_key(&id) {
            self.forget(id);
        } else if !staying.is_empty() {
            if let Some(p) = &path {
                self.watch(cg, p, id);
            }
        }
    }

    /// Ends the leases whose TTL ran out (read again from the map first: a renewal since the
    /// snapshot keeps the lease).
    fn expire(&mut self, maps: &mut Maps, cg: &Cgroup2, names: &mut CgroupNames<'_>) {
        let now = leases::now_boot_secs();
        if self.next_expiry.is_none_or(|t| t > now) {
            return;
        }
        let due: Vec<(u16, u64)> = self
            .snapshot
            .iter()
            .filter(|(_, l)| leases::expired(l, now))
            .map(|(p, l)| (*p, l.cgroup_id))
            .collect();
        for (port, id) in due {
            match maps.leases().get(port) {
                Ok(Some(l)) if l.cgroup_id == id && leases::expired(&l, now) => {}
                Ok(_) => continue,
                Err(e) => {
                    warn!("reading the lease of port {port}: {e}");
                    continue;
                }
            }
            match maps.leases_mut().release_if_held_by(port, id) {
                Ok(true) => {
                    self.reaped += 1;
                    maps.leases().count_end(Ended::Expired);
                    let who = match find(cg, names, id) {
                        Ok(Seen::At(p)) => logfmt::value(p.as_str()).into_owned(),
                        _ => format!("(id {id})"),
                    };
                    info!("lease ended: port={port} cgroup={who} (its TTL ran out)");
                }
                Ok(false) | Err(LeaseError::NotLeased(_)) => {}
                Err(e) => warn!("ending the expired lease of port {port}: {e}"),
            }
        }
        // Read the map again on the next run (the releases moved the generation anyway): it
        // sets the next expiry.
        self.next_expiry = None;
        self.generation = None;
    }

    /// A cgroup that could not be looked at: its leases stay, and it is looked at every tick
    /// until it can be (said once per cgroup).
    fn retry(&mut self, id: u64, e: &IoError) {
        if self.failing.insert(id) {
            warn!("cannot look at lessee cgroup id {id} ({e}); its leases stay, looking again every second");
        }
    }

    fn unretried(&mut self, id: u64) {
        if self.failing.remove(&id) {
            info!("lessee cgroup id {id} can be looked at again");
        }
    }

    /// Removes the spawn parent's child `name` when `spawn` (or `lease`, for its scratch cgroup)
    /// was killed between making it and claiming a port: no lease, no process, and made more
    /// than [`ABANDONED_AFTER`] ago (a leaf cgroup's mtime is its creation time; spawn moves
    /// itself in within milliseconds of the mkdir). True when it was removed.
    fn remove_if_abandoned(
        &mut self,
        cg: &Cgroup2,
        sp: &CgroupPath,
        name: &std::ffi::OsStr,
    ) -> bool {
        let Some(child) = name.to_str().and_then(|n| sp.join(n).ok()) else {
            return false;
        };
        let Ok(id) = cg.id(&child) else { return false };
        // Only when it is positively empty.
        if self.by_cgroup.contains_key(&id) || !matches!(cg.populated(&child), Ok(Some(false))) {
            return false;
        }
        let dir = cg.dir(&child);
        let age = fs::metadata(&dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_none_or(|a| a < ABANDONED_AFTER) {
            return false;
        }
        match fs::remove_dir(&dir) {
            Ok(()) => {
                info!("removed cgroup {}: made by a spawn or lease that never claimed a port, empty for more than {} s", logfmt::value(child.as_str()), ABANDONED_AFTER.as_secs());
                self.forget(id);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => {
                warn!(
                    "removing abandoned cgroup {}: {e}",
                    logfmt::value(child.as_str())
                );
                false
            }
        }
    }

    /// Watches the spawn parent's child `name`, if it is a cgroup.
    fn watch_child(&mut self, cg: &Cgroup2, sp: &CgroupPath, name: &std::ffi::OsStr) {
        if let Some(child) = name.to_str().and_then(|n| sp.join(n).ok()) {
            if let Ok(id) = cg.id(&child) {
                self.watch(cg, &child, id);
            }
        }
    }

    /// Watches `id`, or looks at it every tick when inotify cannot.
    fn watch(&mut self, cg: &Cgroup2, path: &CgroupPath, id: u64) {
        if self.watcher.watch(cg, path, id) {
            self.unwatched.remove(&id);
        } else if self.unwatched.insert(id) && self.unwatched.len() == 1 {
            warn!(
                "inotify cannot watch {path} (fs.inotify.max_user_watches?): cgroups without a watch are looked at every second"
            );
        }
    }

    fn forget(&mut self, id: u64) {
        self.watcher.unwatch(id);
        self.unwatched.remove(&id);
        self.seen_populated.remove(&id);
    }
}
