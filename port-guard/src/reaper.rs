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
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
};

use log::{info, warn};

use crate::{
    cgroup::{Cgroup2, CgroupPath},
    guard::{CgroupNames, Maps},
    leases,
};

/// inotify on `cgroup.events` files.
pub struct Watcher {
    fd: OwnedFd,
    /// watch descriptor → cgroup id.
    watches: HashMap<i32, u64>,
    by_id: HashMap<u64, i32>,
    dir_watch: Option<i32>,
}

impl Watcher {
    pub fn new() -> io::Result<Watcher> {
        // SAFETY: inotify_init1 returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        Ok(Watcher {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            watches: HashMap::new(),
            by_id: HashMap::new(),
            dir_watch: None,
        })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn watch(&mut self, cg: &Cgroup2, path: &CgroupPath, id: u64) {
        if self.by_id.contains_key(&id) {
            return;
        }
        let file = cg.dir(path).join("cgroup.events");
        let Ok(c) = CString::new(file.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: valid fd and C string.
        let wd =
            unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) };
        if wd >= 0 {
            self.watches.insert(wd, id);
            self.by_id.insert(id, wd);
        }
    }

    /// Watches the spawn parent for new cgroups (IN_CREATE), so a VM that lives for less than
    /// a rescan interval is still seen to exit.
    fn watch_dir(&mut self, cg: &Cgroup2, path: &CgroupPath) {
        if self.dir_watch.is_some() {
            return;
        }
        let Ok(c) = CString::new(cg.dir(path).as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: valid fd and C string.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::IN_CREATE | libc::IN_ONLYDIR,
            )
        };
        if wd >= 0 {
            self.dir_watch = Some(wd);
        }
    }

    fn unwatch(&mut self, id: u64) {
        if let Some(wd) = self.by_id.remove(&id) {
            self.watches.remove(&wd);
            // SAFETY: valid fd; a stale wd only returns EINVAL.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
        }
    }

    /// Reads and discards pending events; returns whether there were any.
    pub fn drain(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: reading into a local buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return any;
            }
            any = true;
        }
    }
}

/// inotify on directories (IN_CREATE/IN_DELETE): tells the daemon at once when an allowed
/// cgroup, or an ancestor of one, is created or removed.
pub struct DirWatch {
    fd: OwnedFd,
}

impl DirWatch {
    pub fn new() -> io::Result<DirWatch> {
        // SAFETY: inotify_init1 returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        Ok(DirWatch {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Watches the nearest existing directory at or above `path` (adding a watch twice is a no-op).
    pub fn watch_nearest(&self, dir: &std::path::Path) {
        let mut d = dir.parent().map(|p| p.to_path_buf()).unwrap_or_default();
        while !d.is_dir() {
            if !d.pop() {
                return;
            }
        }
        let Ok(c) = CString::new(d.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: valid fd and C string.
        unsafe {
            libc::inotify_add_watch(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::IN_CREATE | libc::IN_DELETE | libc::IN_ONLYDIR,
            )
        };
    }

    /// Reads and discards pending events; returns whether there were any.
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: reading into a local buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return any;
            }
            any = true;
        }
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
