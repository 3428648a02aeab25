//! Ending leases whose cgroup is gone or has emptied.
//!
//! A lease to a cgroup that `spawn` made (directly below the spawn parent) ends when that cgroup
//! has no process left: spawn moved itself in before it claimed, so empty means the VM exited.
//! The lease and the cgroup are removed. A lease to any other cgroup (`lease --cgroup`, where
//! the orchestrator starts qemu after leasing) ends when its cgroup is removed, or when the
//! daemon has seen it populated and then empty.
//!
//! Liveness never depends on a cgroup's path: each lessee cgroup is reached once by its id (a
//! file handle, [`CgroupNames::reach`]) and kept open, and its `cgroup.events` is read through
//! that directory fd (ENOENT or ENODEV: removed). A cgroup with a path longer than PATH_MAX, or
//! one that cannot be named at all, costs nothing more than the others, and one lessee that
//! cannot be looked at never changes how the others are handled.
//!
//! The work is proportional to what changed, not to the number of leases:
//! - inotify on each lessee's `cgroup.events` and on its parent (IN_DELETE), and on the spawn
//!   parent from its children's creation, says which cgroup to look at when a VM exits;
//! - the lease map is read (in batches) only when the allocators' generation counter moved, once
//!   a second at most, and only cgroups that gained a lease are looked at then;
//! - every [`FULL_PASS`] (and when inotify overflows) every lessee cgroup is looked at and the
//!   leased-port bitmap is reconciled with the lease map, as a safety net.
//!
//! A lease ends only on evidence: the cgroup is gone (a stale handle, ENOENT/ENODEV through its
//! fd, or not found by a walk that read every directory) or it is empty. Any other failure to
//! look keeps the lease, and the cgroup is looked at again on the next tick.

mod lessee;
mod watcher;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    time::{Duration, Instant},
};

use log::{info, warn};
use port_guard_common::Lease;

use self::{
    lessee::{Lessee, Looked},
    watcher::{About, Watcher},
};
use crate::{
    cgroup::{Cgroup2, CgroupNames, CgroupPath},
    error::IoError,
    leases::{self, Ended, LeaseError},
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

/// What the reaper works with: the maps, the cgroup tree and its names, the spawn parent.
pub struct Ctx<'c, 'n> {
    pub maps: &'c mut Maps,
    pub cg: &'c Cgroup2,
    pub names: &'c mut CgroupNames<'n>,
    pub spawn_parent: &'c CgroupPath,
}

/// Lease bookkeeping across passes.
pub struct Reaper {
    watcher: Watcher,
    /// Lessee cgroups (and the spawn parent's children), open.
    lessees: HashMap<u64, Lessee>,
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
    /// Cgroups looked at every tick: inotify could not watch them, they could not be looked at
    /// (an error, not evidence), or the background walk has not reached them yet.
    every_tick: HashSet<u64>,
    /// Of them, those that failed (said once each).
    failing: HashSet<u64>,
}

fn group(leases: &BTreeMap<u16, Lease>) -> HashMap<u64, Vec<u16>> {
    let mut by: HashMap<u64, Vec<u16>> = HashMap::new();
    for (port, lease) in leases {
        by.entry(lease.cgroup_id).or_default().push(*port);
    }
    by
}

impl Reaper {
    /// The inotify instance the daemon waits on.
    pub fn inotify_fd(&self) -> &std::os::fd::OwnedFd {
        self.watcher.inotify.fd()
    }

    pub fn new() -> io::Result<Reaper> {
        Ok(Reaper {
            watcher: Watcher::new()?,
            lessees: HashMap::new(),
            seen_populated: HashSet::new(),
            reaped: 0,
            by_cgroup: HashMap::new(),
            snapshot: BTreeMap::new(),
            next_expiry: None,
            generation: None,
            last_full: None,
            every_tick: HashSet::new(),
            failing: HashSet::new(),
        })
    }

    /// One pass: reads what woke it, looks at the cgroups that may have changed, ends the
    /// leases of those that are gone or emptied.
    pub fn run(&mut self, wake: Wake, ctx: &mut Ctx<'_, '_>) {
        let mut full =
            matches!(wake, Wake::Full) || self.last_full.is_none_or(|t| t.elapsed() >= FULL_PASS);
        let mut check: HashSet<u64> = HashSet::new();
        if matches!(wake, Wake::Inotify) {
            full |= self.heard(ctx, &mut check);
        }
        if !self.read_leases(ctx.maps, full, &mut check) {
            return;
        }
        self.expire(ctx);
        if matches!(wake, Wake::Tick) {
            check.extend(self.every_tick.iter().copied());
        }
        if full {
            check.extend(self.by_cgroup.keys().copied());
            check.extend(self.lessees.keys().copied());
            self.spawn_parent_pass(ctx);
            self.watcher.prune_parents();
            self.prune_shares(ctx);
            self.last_full = Some(Instant::now());
        }
        for id in check {
            self.check(id, ctx);
        }
    }

    /// The cgroups inotify says changed; true when the queue overflowed (look at everything).
    fn heard(&mut self, ctx: &Ctx<'_, '_>, check: &mut HashSet<u64>) -> bool {
        let mut overflow = false;
        for ev in self.watcher.inotify.read_events() {
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                overflow = true;
            } else if let Some(about) = self.watcher.about(&ev) {
                match about {
                    About::Cgroup(id) => {
                        check.insert(id);
                    }
                    About::Parent(p) => check.extend(self.watcher.children_of(p)),
                }
            } else if Some(ev.wd) == self.watcher.dir_watch && ev.mask & libc::IN_CREATE != 0 {
                // A cgroup made below the spawn parent: watch it from now on, so a VM that
                // lives for less than a tick is still seen to exit.
                if let Some(name) = ev.name.as_ref().and_then(|n| n.to_str()) {
                    self.open_spawned(ctx, name);
                }
            }
        }
        overflow
    }

    /// Reads the lease map when an allocator changed it (or on a full pass); false when it
    /// cannot be read (nothing is done this pass).
    fn read_leases(&mut self, maps: &Maps, full: bool, check: &mut HashSet<u64>) -> bool {
        let generation = maps.leases().generation();
        if !full && self.generation == Some(generation) {
            return true;
        }
        let leases = match maps.leases().all() {
            Ok(l) => l,
            Err(e) => {
                warn!("reading leases: {e}");
                return false;
            }
        };
        self.generation = Some(generation);
        self.next_expiry = leases
            .values()
            .filter(|l| l.expires != 0)
            .map(|l| l.expires)
            .min();
        let by = group(&leases);
        // Cgroups that gained a lease since the last read, and those that lost every lease
        // (no longer ours to watch; spawned ones stay watched until they are removed).
        check.extend(by.keys().filter(|id| !self.by_cgroup.contains_key(id)));
        check.extend(self.by_cgroup.keys().filter(|id| !by.contains_key(id)));
        self.by_cgroup = by;
        if full {
            let (cleared, set) = maps.leases().reconcile(&leases);
            if cleared + set > 0 {
                info!("leased-port bitmap reconciled with the lease map: {cleared} stale marks cleared, {set} marks added");
            }
        }
        self.snapshot = leases;
        true
    }

    /// Every child of the spawn parent: abandoned ones removed, the others watched.
    fn spawn_parent_pass(&mut self, ctx: &Ctx<'_, '_>) {
        let dir = ctx.cg.dir(ctx.spawn_parent);
        self.watcher.watch_dir(&dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if entry.file_type().is_ok_and(|t| t.is_dir()) && !self.remove_if_abandoned(ctx, &name)
            {
                self.open_spawned(ctx, &name);
            }
        }
    }

    /// Opens (and watches) the spawn parent's child `name`.
    fn open_spawned(&mut self, ctx: &Ctx<'_, '_>, name: &str) {
        let Ok(path) = ctx.spawn_parent.join(name) else {
            return;
        };
        if let Ok(Some(l)) = Lessee::open_spawned(ctx.cg, &path) {
            let id = l.id;
            self.lessees.entry(id).or_insert(l);
            self.watch(id);
        }
    }

    /// The lessee `id`, opened if it is not yet: by its file handle, or by the walk.
    fn reach(&mut self, id: u64, ctx: &mut Ctx<'_, '_>) -> Result<Option<&Lessee>, Looked> {
        if let std::collections::hash_map::Entry::Vacant(v) = self.lessees.entry(id) {
            let sp_id = ctx.cg.id(ctx.spawn_parent).ok();
            match Lessee::reach(id, ctx.names, sp_id)? {
                Some(l) => {
                    v.insert(l);
                }
                None => return Ok(None),
            }
        }
        Ok(self.lessees.get(&id))
    }

    /// Looks at one cgroup: ends its leases when it is gone or emptied, keeps it watched while
    /// it lives. When it cannot be looked at, nothing ends: it is looked at again next tick.
    fn check(&mut self, id: u64, ctx: &mut Ctx<'_, '_>) {
        let ports = self.by_cgroup.get(&id).cloned().unwrap_or_default();
        let looked = match self.reach(id, ctx) {
            Ok(Some(l)) => l.look(),
            Ok(None) => Ok(Looked::Gone),
            Err(e) => Err(e),
        };
        let looked = match looked {
            Ok(l) => l,
            Err(Looked::Pending) => {
                self.every_tick.insert(id);
                return;
            }
            Err(Looked::Failed(e)) => {
                self.retry(id, &e);
                return;
            }
            Err(other) => other,
        };
        self.unretried(id);
        let spawned = self.lessees.get(&id).is_some_and(|l| l.spawned);
        if ports.is_empty() {
            // No lease (yet: spawn makes its cgroup before it claims): nothing to end. A cgroup
            // made by spawn stays watched for its claim and its exit.
            if spawned && !matches!(looked, Looked::Gone) {
                self.watch(id);
            } else {
                self.forget(id);
            }
            return;
        }
        let how = match looked {
            Looked::Gone => Ended::Removed,
            Looked::Populated => {
                self.seen_populated.insert(id);
                self.watch(id);
                return;
            }
            Looked::Empty => Ended::Emptied,
            Looked::Pending | Looked::Failed(_) => unreachable!("handled above"),
        };
        let (ending, staying) = self.partition(id, how, ports, spawned);
        if ending.is_empty() {
            self.watch(id);
            return;
        }
        let (who, name) = self.who(id, ctx);
        let why = match how {
            Ended::Emptied => format!("{name} has no process left"),
            _ => "its cgroup was removed".to_owned(),
        };
        self.end(id, &ending, how, &who, &why, ctx.maps);
        if how == Ended::Emptied && spawned {
            if let Some(l) = self.lessees.get(&id) {
                l.remove_spawned(ctx.cg, ctx.spawn_parent);
            }
        }
        if how == Ended::Removed || spawned || !self.by_cgroup.contains_key(&id) {
            self.forget(id);
        } else if !staying.is_empty() {
            self.watch(id);
        }
    }

    /// Which of `ports` an emptied or removed cgroup ends: all of a removed one; of an empty
    /// one, those that end that way once a process was there: a spawn lease (spawn moves itself
    /// in before it claims), and an until-empty one whose cgroup was seen populated or has used
    /// CPU time since the lease was made (a process that came and went between two looks).
    fn partition(
        &self,
        id: u64,
        how: Ended,
        ports: Vec<u16>,
        spawned: bool,
    ) -> (Vec<u16>, Vec<u16>) {
        if how != Ended::Emptied || spawned {
            return (ports, Vec::new());
        }
        let usage = self.lessees.get(&id).and_then(Lessee::cpu_usec);
        let seen = self.seen_populated.contains(&id);
        ports.into_iter().partition(|port| {
            self.snapshot.get(port).is_some_and(|l| {
                l.flags & port_guard_common::LEASE_UNTIL_EMPTY != 0
                    && (seen || usage.is_some_and(|u| l.cpu_usec != u64::MAX && u > l.cpu_usec))
            })
        })
    }

    /// Ends the leases of `ports` that `id` still holds.
    fn end(&mut self, id: u64, ports: &[u16], how: Ended, who: &str, why: &str, maps: &mut Maps) {
        let mut ended = Vec::new();
        for &port in ports {
            // The lease may have changed hands since it was read (`lease` hands a port from
            // its scratch cgroup to the target, then removes the scratch cgroup): end it only
            // if it is still this cgroup's.
            match maps.leases_mut().release_if_held_by(port, id) {
                Ok(true) => {
                    self.reaped += 1;
                    maps.leases().count_end(how);
                    ended.push(port);
                    info!("lease ended: port={port} {who} ({why})");
                }
                Ok(false) | Err(LeaseError::NotLeased(_)) => ended.push(port),
                Err(e) => warn!("ending lease of port {port}: {e}"),
            }
        }
        if let Some(left) = self.by_cgroup.get_mut(&id) {
            left.retain(|p| !ended.contains(p));
            if left.is_empty() {
                self.by_cgroup.remove(&id);
            }
        }
    }

    /// A lessee for a log line: `cgroup=/path`, or `cgroup_id=N` when it has no name at once;
    /// and its name alone (the path, or `cgroup id N`).
    fn who(&self, id: u64, ctx: &mut Ctx<'_, '_>) -> (String, String) {
        let by_fd = self
            .lessees
            .get(&id)
            .and_then(|l| ctx.cg.path_of_fd(&l.dir).ok().flatten());
        let name = by_fd
            .map(|p| p.to_string())
            .or_else(|| crate::events::CgroupNamer::name_now(ctx.names, id));
        match name {
            Some(n) => {
                let v = crate::logfmt::value(&n).into_owned();
                (format!("cgroup={v}"), v)
            }
            None => (format!("cgroup_id={id}"), format!("cgroup id {id}")),
        }
    }

    /// Ends the leases whose TTL ran out (read again from the map first: a renewal since the
    /// snapshot keeps the lease).
    fn expire(&mut self, ctx: &mut Ctx<'_, '_>) {
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
            match ctx.maps.leases().get(port) {
                Ok(Some(l)) if l.cgroup_id == id && leases::expired(&l, now) => {}
                Ok(_) => continue,
                Err(e) => {
                    warn!("reading the lease of port {port}: {e}");
                    continue;
                }
            }
            match ctx.maps.leases_mut().release_if_held_by(port, id) {
                Ok(true) => {
                    self.reaped += 1;
                    ctx.maps.leases().count_end(Ended::Expired);
                    let (who, _) = self.who(id, ctx);
                    info!("lease ended: port={port} {who} (its TTL ran out)");
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

    /// The share counts of units whose cgroup is gone and that hold nothing go (their entries
    /// would otherwise stay for ever).
    fn prune_shares(&self, ctx: &mut Ctx<'_, '_>) {
        if !ctx.names.handles() {
            // Without handles every unit would cost a walk; the entries are small and bounded.
            return;
        }
        let cg = ctx.cg;
        if let Err(e) = ctx
            .maps
            .prune_shares(|unit| matches!(cg.open_by_id(unit), Ok(None)))
        {
            warn!("pruning the per-child shares of removed cgroups: {e}");
        }
    }

    /// A cgroup that could not be looked at: its leases stay, and it is looked at every tick
    /// until it can be (said once per cgroup).
    fn retry(&mut self, id: u64, e: &IoError) {
        self.every_tick.insert(id);
        if self.failing.insert(id) {
            warn!("cannot look at lessee cgroup id {id} ({e}); its leases stay, looking again every second");
        }
    }

    fn unretried(&mut self, id: u64) {
        self.every_tick.remove(&id);
        if self.failing.remove(&id) {
            info!("lessee cgroup id {id} can be looked at again");
        }
    }

    /// Removes the spawn parent's child `name` when `spawn` (or `lease`, for its scratch cgroup)
    /// was killed between making it and claiming a port: no lease, no process, and made more
    /// than [`ABANDONED_AFTER`] ago (a leaf cgroup's mtime is its creation time; spawn moves
    /// itself in within milliseconds of the mkdir). True when it was removed.
    fn remove_if_abandoned(&mut self, ctx: &Ctx<'_, '_>, name: &str) -> bool {
        let Ok(child) = ctx.spawn_parent.join(name) else {
            return false;
        };
        let Ok(id) = ctx.cg.id(&child) else {
            return false;
        };
        // Only when it is positively empty.
        if self.by_cgroup.contains_key(&id) || !matches!(ctx.cg.populated(&child), Ok(Some(false)))
        {
            return false;
        }
        let dir = ctx.cg.dir(&child);
        let age = std::fs::metadata(&dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_none_or(|a| a < ABANDONED_AFTER) {
            return false;
        }
        let shown = crate::logfmt::value(child.as_str()).into_owned();
        match std::fs::remove_dir(&dir) {
            Ok(()) => {
                info!("removed cgroup {shown}: made by a spawn or lease that never claimed a port, empty for more than {} s", ABANDONED_AFTER.as_secs());
                self.forget(id);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => {
                warn!("removing abandoned cgroup {shown}: {e}");
                false
            }
        }
    }

    /// Watches `id`, or looks at it every tick when inotify cannot.
    fn watch(&mut self, id: u64) {
        let Some(l) = self.lessees.get(&id) else {
            return;
        };
        if self.watcher.watch(id, &l.dir, l.parent) {
            if !self.failing.contains(&id) {
                self.every_tick.remove(&id);
            }
        } else if self.every_tick.insert(id) && self.every_tick.len() == 1 {
            warn!(
                "inotify cannot watch cgroup id {id} (fs.inotify.max_user_watches?): cgroups without a watch are looked at every second"
            );
        }
    }

    fn forget(&mut self, id: u64) {
        self.watcher.unwatch(id);
        self.every_tick.remove(&id);
        self.failing.remove(&id);
        self.seen_populated.remove(&id);
        self.lessees.remove(&id);
    }
}
