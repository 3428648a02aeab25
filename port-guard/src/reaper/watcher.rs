//! The reaper's inotify watches on lessee cgroups, and which cgroup an event is about.

use std::{
    collections::{HashMap, HashSet},
    io,
};

use crate::{
    cgroup::{Cgroup2, CgroupPath},
    inotify::Inotify,
};

/// inotify on lessee cgroups: each one's `cgroup.events` (IN_MODIFY: populated changed) and its
/// parent directory (IN_DELETE: the cgroup was removed; removing a cgroup sends nothing through
/// the files inside it, and no IN_DELETE_SELF either while a watch holds its inode).
pub(super) struct Watcher {
    pub(super) inotify: Inotify,
    /// cgroup id → (its cgroup.events watch, its path).
    pub(super) by_id: HashMap<u64, (i32, CgroupPath)>,
    /// cgroup.events watch → cgroup id.
    by_wd: HashMap<i32, u64>,
    /// Watched cgroups by path, for IN_DELETE events (which name the child).
    by_path: HashMap<CgroupPath, u64>,
    /// Parent directory watches: wd → parent path.
    parents: HashMap<i32, CgroupPath>,
    /// The spawn parent's watch (IN_CREATE too); never removed.
    pub(super) dir_watch: Option<i32>,
}

/// Every watch on a directory is added with IN_MASK_ADD: one inode has one watch, and a parent
/// can be both the spawn parent (IN_CREATE) and a lessee's parent (IN_DELETE).
const DIR_MASK: u32 = libc::IN_ONLYDIR | libc::IN_MASK_ADD;

impl Watcher {
    pub fn new() -> io::Result<Watcher> {
        Ok(Watcher {
            inotify: Inotify::new()?,
            by_id: HashMap::new(),
            by_wd: HashMap::new(),
            by_path: HashMap::new(),
            parents: HashMap::new(),
            dir_watch: None,
        })
    }

    /// Watches a cgroup. False when inotify refuses (fs.inotify.max_user_watches): the caller
    /// must look at the cgroup some other way.
    pub(super) fn watch(&mut self, cg: &Cgroup2, path: &CgroupPath, id: u64) -> bool {
        if self.by_id.contains_key(&id) {
            return true;
        }
        let Some(parent) = path.parent() else {
            return false;
        };
        let Some(pwd) = self
            .inotify
            .add(&cg.dir(&parent), libc::IN_DELETE | DIR_MASK)
        else {
            return false;
        };
        self.parents.insert(pwd, parent);
        let Some(wd) = self
            .inotify
            .add(&cg.dir(path).join("cgroup.events"), libc::IN_MODIFY)
        else {
            return false;
        };
        self.by_id.insert(id, (wd, path.clone()));
        self.by_wd.insert(wd, id);
        self.by_path.insert(path.clone(), id);
        true
    }

    /// Watches the spawn parent for new cgroups (IN_CREATE), so a VM that lives for less than
    /// a tick is still seen to exit.
    pub(super) fn watch_dir(&mut self, cg: &Cgroup2, path: &CgroupPath) {
        if self.dir_watch.is_none() {
            self.dir_watch = self.inotify.add(&cg.dir(path), libc::IN_CREATE | DIR_MASK);
        }
    }

    pub(super) fn unwatch(&mut self, id: u64) {
        if let Some((wd, path)) = self.by_id.remove(&id) {
            self.by_wd.remove(&wd);
            self.by_path.remove(&path);
            self.inotify.remove(wd);
        }
    }

    /// Removes parent watches no watched cgroup needs (the spawn parent's stays).
    pub(super) fn prune_parents(&mut self) {
        let needed: HashSet<CgroupPath> =
            self.by_path.keys().filter_map(CgroupPath::parent).collect();
        let dir_watch = self.dir_watch;
        let inotify = &self.inotify;
        self.parents.retain(|wd, path| {
            let keep = Some(*wd) == dir_watch || needed.contains(path);
            if !keep {
                inotify.remove(*wd);
            }
            keep
        });
    }

    /// The cgroup an event is about, if it is one of ours.
    pub(super) fn cgroup_of(&self, ev: &crate::inotify::Event) -> Option<u64> {
        if let Some(&id) = self.by_wd.get(&ev.wd) {
            return Some(id);
        }
        if ev.mask & libc::IN_DELETE != 0 {
            let parent = self.parents.get(&ev.wd)?;
            let child = parent.join(ev.name.as_ref()?.to_str()?).ok()?;
            return self.by_path.get(&child).copied();
        }
        None
    }
}
