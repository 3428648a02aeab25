//! Ending leases whose cgroup is gone or has emptied.
//!
//! A lease to a cgroup that `spawn` made (directly below the spawn parent) ends when that cgroup
//! has no process left: spawn moved itself in before it claimed, so empty means the VM exited.
//! The lease and the cgroup are removed. A lease to any other cgroup (`lease --cgroup`, where
//! the orchestrator starts qemu after leasing) ends when its cgroup is removed, or when the
//! daemon has seen it populated and then empty. The daemon learns of changes from inotify on
//! each leased cgroup's `cgroup.events` and on the spawn parent (new VM cgroups are watched from
//! their creation), and rescans the lease map every second as a safety net.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
};

use log::{info, warn};

use crate::{
    cgroup::{Cgroup2, CgroupPath},
    guard::{CgroupNames, Maps},
    inotify::Inotify,
    leases,
};

/// inotify on `cgroup.events` files.
pub struct Watcher {
    pub inotify: Inotify,
    /// cgroup id → watch descriptor.
    by_id: HashMap<u64, i32>,
    dir_watch: Option<i32>,
}

impl Watcher {
    pub fn new() -> io::Result<Watcher> {
        Ok(Watcher {
            inotify: Inotify::new()?,
            by_id: HashMap::new(),
            dir_watch: None,
        })
    }

    fn watch(&mut self, cg: &Cgroup2, path: &CgroupPath, id: u64) {
        if self.by_id.contains_key(&id) {
            return;
        }
        if let Some(wd) = self
            .inotify
            .add(&cg.dir(path).join("cgroup.events"), libc::IN_MODIFY)
        {
            self.by_id.insert(id, wd);
        }
    }

    /// Watches the spawn parent for new cgroups (IN_CREATE), so a VM that lives for less than
    /// a rescan interval is still seen to exit.
    fn watch_dir(&mut self, cg: &Cgroup2, path: &CgroupPath) {
        if self.dir_watch.is_none() {
            self.dir_watch = self
                .inotify
                .add(&cg.dir(path), libc::IN_CREATE | libc::IN_ONLYDIR);
        }
    }

    fn unwatch(&mut self, id: u64) {
        if let Some(wd) = self.by_id.remove(&id) {
            self.inotify.remove(wd);
        }
    }
}

/// Watches the nearest existing directory above each of `dirs` for IN_CREATE/IN_DELETE: tells
/// the daemon at once when an allowed cgroup, or an ancestor of one, is created or removed.
/// Adding a watch twice is a no-op.
pub fn watch_parents(inotify: &Inotify, dirs: impl IntoIterator<Item = std::path::PathBuf>) {
    for dir in dirs {
        let mut d = dir.parent().map(|p| p.to_path_buf()).unwrap_or_default();
        while !d.is_dir() {
            if !d.pop() {
                break;
            }
        }
        inotify.add(&d, libc::IN_CREATE | libc::IN_DELETE | libc::IN_ONLYDIR);
    }
}

/// Lease bookkeeping across scans.
pub struct Reaper {
    pub watcher: Watcher,
    /// Lessee cgroups seen with processes in them.
    seen_populated: HashSet<u64>,
    pub reaped: u64,
}

/// `populated` from a cgroup's `cgroup.events`; None when the cgroup is gone.
fn populated(cg: &Cgroup2, path: &CgroupPath) -> Option<bool> {
    let text = fs::read_to_string(cg.dir(path).join("cgroup.events")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() == "1")
}

impl Reaper {
    pub fn new() -> io::Result<Reaper> {
        Ok(Reaper {
            watcher: Watcher::new()?,
            seen_populated: HashSet::new(),
            reaped: 0,
        })
    }

    /// One pass over the lease map.
    pub fn scan(
        &mut self,
        maps: &mut Maps,
        cg: &Cgroup2,
        names: &mut CgroupNames<'_>,
        spawn_parent: Option<&CgroupPath>,
    ) {
        let leases = match maps.leases() {
            Ok(l) => l,
            Err(e) => {
                warn!("reading leases: {e}");
                return;
            }
        };
        let mut live: HashSet<u64> = HashSet::new();
        // Every cgroup below the spawn parent is watched from its creation on, leased yet or not.
        if let Some(sp) = spawn_parent {
            self.watcher.watch_dir(cg, sp);
            if let Ok(entries) = fs::read_dir(cg.dir(sp)) {
                for entry in entries.flatten() {
                    let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                        continue;
                    };
                    let Ok(child) = sp.join(&name) else { continue };
                    if let Ok(id) = cg.id(&child) {
                        live.insert(id);
                        self.watcher.watch(cg, &child, id);
                    }
                }
            }
        }
        for (port, lease) in leases {
            let id = lease.cgroup_id;
            let path = names.lookup(id);
            // The cgroup at that path may be a newer one with the same name: compare ids.
            let path = path.filter(|p| cg.id(p).ok() == Some(id));
            let reason = match &path {
                None => Some("its cgroup was removed".to_owned()),
                Some(p) => match populated(cg, p) {
                    None => Some("its cgroup was removed".to_owned()),
                    Some(true) => {
                        self.seen_populated.insert(id);
                        None
                    }
                    Some(false) => {
                        let spawned = spawn_parent.is_some_and(|sp| leases::is_spawned(p, sp));
                        (spawned || self.seen_populated.contains(&id))
                            .then(|| format!("{p} has no process left"))
                    }
                },
            };
            match reason {
                None => {
                    live.insert(id);
                    if let Some(p) = &path {
                        self.watcher.watch(cg, p, id);
                    }
                }
                Some(why) => {
                    // The lease may have changed hands since the snapshot (`lease` hands a port
                    // from its scratch cgroup to the target, then removes the scratch cgroup):
                    // end it only if it is still this cgroup's.
                    match maps.leases.get(&port, 0) {
                        Ok(now) if now.cgroup_id == id => {}
                        _ => continue,
                    }
                    match leases::release(maps, port as u16) {
                        Ok(()) | Err(leases::LeaseError::NotLeased(_)) => {
                            self.reaped += 1;
                            info!(
                                "lease ended: port={port} cgroup={} ({why})",
                                path.as_ref()
                                    .map(|p| p.to_string())
                                    .unwrap_or(format!("(id {id})"))
                            );
                        }
                        Err(e) => warn!("ending lease of port {port}: {e}"),
                    }
                    if let (Some(p), Some(sp)) = (&path, spawn_parent) {
                        if leases::is_spawned(p, sp) {
                            match fs::remove_dir(cg.dir(p)) {
                                Ok(()) => info!("removed cgroup {p}"),
                                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                                Err(e) => warn!("removing cgroup {p}: {e}"),
                            }
                        }
                    }
                }
            }
        }
        let stale: Vec<u64> = self
            .watcher
            .by_id
            .keys()
            .copied()
            .filter(|id| !live.contains(id))
            .collect();
        for id in stale {
            self.watcher.unwatch(id);
            self.seen_populated.remove(&id);
        }
    }
}
