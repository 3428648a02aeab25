//! The reaper's inotify watches on lessee cgroups, reached through their directory fds (never
//! by path: a cgroup's path may be longer than PATH_MAX), and which cgroup an event is about.

use std::{
    collections::{HashMap, HashSet},
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    path::PathBuf,
};

use crate::inotify::Inotify;

/// inotify on lessee cgroups: each one's `cgroup.events` (IN_MODIFY: populated changed) and its
/// parent directory (IN_DELETE: a child was removed; removing a cgroup sends nothing through the
/// files inside it, and no IN_DELETE_SELF either while a watch holds its inode).
pub(super) struct Watcher {
    pub(super) inotify: Inotify,
    /// cgroup id → its cgroup.events watch and its parent's id.
    pub(super) by_id: HashMap<u64, (i32, u64)>,
    /// cgroup.events watch → cgroup id.
    by_wd: HashMap<i32, u64>,
    /// Parent directories watched: parent id → (its fd, its watch).
    parents: HashMap<u64, (OwnedFd, i32)>,
    /// Parent watch → parent id.
    parent_of_wd: HashMap<i32, u64>,
    /// The spawn parent's watch (IN_CREATE too); never removed.
    pub(super) dir_watch: Option<i32>,
}

/// Every watch on a directory is added with IN_MASK_ADD: one inode has one watch, and a parent
/// can be both the spawn parent (IN_CREATE) and a lessee's parent (IN_DELETE).
const DIR_MASK: u32 = libc::IN_ONLYDIR | libc::IN_MASK_ADD;

/// The path inotify reaches an open directory (or a file in it) by.
fn via(fd: &OwnedFd, file: Option<&str>) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    if let Some(f) = file {
        p.push(f);
    }
    p
}

/// What an inotify event is about.
pub(super) enum About {
    /// A watched cgroup's cgroup.events changed.
    Cgroup(u64),
    /// A child of a watched parent was removed: one of the cgroups below it may be gone.
    Parent(u64),
}

impl Watcher {
    pub fn new() -> io::Result<Watcher> {
        Ok(Watcher {
            inotify: Inotify::new()?,
            by_id: HashMap::new(),
            by_wd: HashMap::new(),
            parents: HashMap::new(),
            parent_of_wd: HashMap::new(),
            dir_watch: None,
        })
    }

    /// Watches the cgroup `id` (directory `dir`, parent `parent` reached through `parent_dir`).
    /// False when inotify refuses (fs.inotify.max_user_watches): the caller must look at the
    /// cgroup some other way.
    pub(super) fn watch(&mut self, id: u64, dir: &OwnedFd, parent: u64) -> bool {
        if self.by_id.contains_key(&id) {
            return true;
        }
        if !self.parents.contains_key(&parent) {
            let Ok(pfd) = open_parent(dir) else {
                return false;
            };
            let Some(pwd) = self
                .inotify
                .add(&via(&pfd, None), libc::IN_DELETE | DIR_MASK)
            else {
                return false;
            };
            self.parent_of_wd.insert(pwd, parent);
            self.parents.insert(parent, (pfd, pwd));
        }
        let Some(wd) = self
            .inotify
            .add(&via(dir, Some("cgroup.events")), libc::IN_MODIFY)
        else {
            return false;
        };
        self.by_id.insert(id, (wd, parent));
        self.by_wd.insert(wd, id);
        true
    }

    /// Watches the spawn parent for new cgroups (IN_CREATE), so a VM that lives for less than
    /// a tick is still seen to exit.
    pub(super) fn watch_dir(&mut self, dir: &std::path::Path) {
        if self.dir_watch.is_none() {
            self.dir_watch = self.inotify.add(dir, libc::IN_CREATE | DIR_MASK);
        }
    }

    pub(super) fn unwatch(&mut self, id: u64) {
        if let Some((wd, _)) = self.by_id.remove(&id) {
            self.by_wd.remove(&wd);
            self.inotify.remove(wd);
        }
    }

    /// Removes parent watches no watched cgroup needs (the spawn parent's stays).
    pub(super) fn prune_parents(&mut self) {
        let needed: HashSet<u64> = self.by_id.values().map(|(_, p)| *p).collect();
        let dir_watch = self.dir_watch;
        let inotify = &self.inotify;
        let parent_of_wd = &mut self.parent_of_wd;
        self.parents.retain(|id, (_, wd)| {
            let keep = Some(*wd) == dir_watch || needed.contains(id);
            if !keep {
                inotify.remove(*wd);
                parent_of_wd.remove(wd);
            }
            keep
        });
    }

    /// The cgroups below parent `parent` that are watched.
    pub(super) fn children_of(&self, parent: u64) -> Vec<u64> {
        self.by_id
            .iter()
            .filter(|(_, (_, p))| *p == parent)
            .map(|(id, _)| *id)
            .collect()
    }

    /// What an event is about, if it is one of ours.
    pub(super) fn about(&self, ev: &crate::inotify::Event) -> Option<About> {
        if let Some(&id) = self.by_wd.get(&ev.wd) {
            return Some(About::Cgroup(id));
        }
        if ev.mask & libc::IN_DELETE != 0 {
            return self.parent_of_wd.get(&ev.wd).map(|p| About::Parent(*p));
        }
        None
    }
}

/// The parent directory of the open directory `dir`.
fn open_parent(dir: &OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: a valid dir fd and a static C string.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c"..".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
