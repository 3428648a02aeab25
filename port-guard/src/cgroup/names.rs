//! Naming cgroup ids, and reaching a cgroup by its id, at a cost nobody can inflate.
//!
//! The id of a cgroup is the file handle of its directory on cgroupfs: with
//! `CAP_DAC_READ_SEARCH` (the unit grants it) `open_by_handle_at` reaches it in O(1), whatever
//! the size of the tree, and its name is the link of the fd. Where handles do not work, a walk
//! of the tree ([`super::walk`], relative to directory fds: no PATH_MAX limit) finds the ids
//! that were asked for. In the daemon that walk runs on a thread of its own, at most about once
//! a second for everything asked since the last one, and nothing waits for it: a log line names
//! the cgroup `cgroup_id=N` until the walk has found it. Ids a complete walk did not find are
//! remembered as gone for a while (a negative cache). A cgroup that exists but whose path is
//! longer than PATH_MAX has no name here (its fd still works), and says so.
//!
//! Names are cached up to [`CACHE_BYTES`] of paths (the least recently used go first), and a
//! name found to be stale (the cgroup renamed or removed) is dropped.

use std::{
    collections::{HashMap, HashSet},
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::mpsc,
    time::{Duration, Instant},
};

use log::{debug, info, warn};

use super::{walk, Cgroup2, CgroupPath};
use crate::error::IoError;

/// Paths cached at most, in bytes.
pub const CACHE_BYTES: usize = 4 << 20;
/// How long an id that a complete walk did not find is taken as gone before it is looked for
/// again.
const GONE_FOR: Duration = Duration::from_secs(30);
/// Ids remembered as gone at most.
const GONE_MAX: usize = 16384;
/// Walks at most this often.
const WALK_EVERY: Duration = Duration::from_secs(1);

/// What reaching a cgroup by id found.
pub enum Reached {
    /// Its directory.
    Dir(OwnedFd),
    /// No cgroup has this id (positive evidence: a stale handle, or a complete walk).
    Gone,
    /// Not known yet: the background walk was asked (daemon without file handles).
    Pending,
}

/// id → path, with what it learnt cached.
pub struct CgroupNames<'a> {
    cg: &'a Cgroup2,
    cache: HashMap<u64, (String, Instant)>,
    cache_bytes: usize,
    gone: HashMap<u64, Instant>,
    /// Whether id → directory by file handle works here (looked at once).
    handles: bool,
    /// The daemon's background walker; None: walks are done in place (one-shot commands).
    walker: Option<Walker>,
}

impl<'a> CgroupNames<'a> {
    /// For one-shot commands: walks, where needed, are done in place.
    pub fn new(cg: &'a Cgroup2) -> Self {
        CgroupNames {
            cg,
            cache: HashMap::new(),
            cache_bytes: 0,
            gone: HashMap::new(),
            handles: handles_work(cg),
            walker: None,
        }
    }

    /// For the daemon: where file handles do not work, walks run on a thread of their own and
    /// nothing waits for them.
    pub fn for_daemon(cg: &'a Cgroup2) -> Self {
        let mut n = CgroupNames::new(cg);
        if !n.handles {
            n.walker = Some(Walker::start(cg.mount().to_owned()));
        }
        n
    }

    /// Whether ids are reached by file handle here.
    pub fn handles(&self) -> bool {
        self.handles
    }

    /// The path of `id` for display: `(gone, id N)` for a cgroup that no longer exists,
    /// `(id N: why)` when it cannot be told.
    pub fn name(&mut self, id: u64) -> String {
        match self.lookup(id) {
            Ok(Some(p)) => p.to_string(),
            Ok(None) => format!("(gone, id {id})"),
            Err(e) => format!("(id {id}: {e})"),
        }
    }

    /// The path of `id`: Ok(None) only when no such cgroup exists. From the cache, from the
    /// file handle, or from a walk (in place; in the daemon, a pending walk is an error).
    pub fn lookup(&mut self, id: u64) -> Result<Option<CgroupPath>, IoError> {
        if let Some(p) = self.cached(id) {
            return parsed(self.cg, id, &p).map(Some);
        }
        if self.is_gone(id) {
            return Ok(None);
        }
        if self.handles {
            return match self.cg.path_of(id) {
                Ok(Some(p)) => {
                    self.remember(id, p.to_string());
                    Ok(Some(p))
                }
                Ok(None) => {
                    self.mark_gone(id);
                    Ok(None)
                }
                Err(e) => Err(IoError::new("name cgroup by handle", self.cg.mount(), e)),
            };
        }
        if self.walker.is_some() {
            self.ask(Some(id), None);
            return Err(IoError::new(
                "name cgroup",
                self.cg.mount(),
                io::Error::other("not found yet (the tree is being walked)"),
            ));
        }
        let found = walk::walk(self.cg.mount(), &[id].into(), &HashSet::new())
            .map_err(|e| IoError::new("walk cgroups", self.cg.mount(), e))?;
        self.take(&found, &[id].into(), &HashSet::new());
        match found.paths.get(&id) {
            Some(p) => parsed(self.cg, id, p).map(Some),
            None if found.complete => Ok(None),
            None => Err(IoError::new(
                "walk cgroups",
                self.cg.mount(),
                io::Error::other("part of the tree could not be read"),
            )),
        }
    }

    /// The directory of cgroup `id`: by file handle, else by a walk (in place, or in the
    /// daemon asked of the background walk: [`Reached::Pending`] until it answers).
    pub fn reach(&mut self, id: u64) -> Result<Reached, IoError> {
        if self.handles {
            return match self.cg.open_by_id(id) {
                Ok(Some(fd)) => Ok(Reached::Dir(fd)),
                Ok(None) => {
                    self.mark_gone(id);
                    Ok(Reached::Gone)
                }
                Err(e) => Err(IoError::new("open cgroup by handle", self.cg.mount(), e)),
            };
        }
        if self.walker.is_some() {
            if let Some(fd) = self.walker.as_mut().and_then(|w| w.fds.remove(&id)) {
                return Ok(Reached::Dir(fd));
            }
            if self.is_gone(id) {
                return Ok(Reached::Gone);
            }
            self.ask(None, Some(id));
            return Ok(Reached::Pending);
        }
        let fds: HashSet<u64> = [id].into();
        let mut found = walk::walk(self.cg.mount(), &HashSet::new(), &fds)
            .map_err(|e| IoError::new("walk cgroups", self.cg.mount(), e))?;
        match found.fds.remove(&id) {
            Some(fd) => Ok(Reached::Dir(fd)),
            None if found.complete => Ok(Reached::Gone),
            None => Err(IoError::new(
                "walk cgroups",
                self.cg.mount(),
                io::Error::other("part of the tree could not be read"),
            )),
        }
    }

    /// Drops what the cache says of `id` (a path that no longer has it: renamed, or removed).
    pub fn forget(&mut self, id: u64) {
        if let Some((p, _)) = self.cache.remove(&id) {
            self.cache_bytes -= p.len();
        }
    }

    /// Takes in what the background walk found since the last call (the daemon's tick).
    pub fn poll(&mut self) {
        let Some(w) = self.walker.as_mut() else {
            return;
        };
        let mut answers = Vec::new();
        while let Ok(a) = w.replies.try_recv() {
            answers.push(a);
        }
        for (asked_names, asked_fds, found) in answers {
            let w = self.walker.as_mut().expect("checked above");
            w.in_flight = false;
            w.fds.extend(found.fds);
            let found = walk::Found {
                paths: found.paths,
                fds: HashMap::new(),
                complete: found.complete,
            };
            for (id, path) in &found.paths {
                if !self.cache.contains_key(id) {
                    info!("cgroup_id={id} is {}", crate::logfmt::value(path));
                }
            }
            self.take(&found, &asked_names, &asked_fds);
        }
        self.send();
    }

    fn cached(&mut self, id: u64) -> Option<String> {
        let (p, used) = self.cache.get_mut(&id)?;
        *used = Instant::now();
        Some(p.clone())
    }

    fn remember(&mut self, id: u64, path: String) {
        self.forget(id);
        self.cache_bytes += path.len();
        self.cache.insert(id, (path, Instant::now()));
        if self.cache_bytes > CACHE_BYTES {
            // The least recently used half goes.
            let mut by_use: Vec<(Instant, u64)> =
                self.cache.iter().map(|(id, (_, t))| (*t, *id)).collect();
            by_use.sort_unstable();
            for (_, id) in by_use.iter().take(by_use.len() / 2) {
                self.forget(*id);
            }
        }
    }

    fn is_gone(&mut self, id: u64) -> bool {
        match self.gone.get(&id) {
            Some(t) if t.elapsed() < GONE_FOR => true,
            Some(_) => {
                self.gone.remove(&id);
                false
            }
            None => false,
        }
    }

    fn mark_gone(&mut self, id: u64) {
        self.forget(id);
        if self.gone.len() >= GONE_MAX {
            self.gone.retain(|_, t| t.elapsed() < GONE_FOR);
            if self.gone.len() >= GONE_MAX {
                self.gone.clear();
            }
        }
        self.gone.insert(id, Instant::now());
    }

    /// The names a walk found; the ids it was asked for and did not find, when it read every
    /// directory, are gone.
    fn take(&mut self, found: &walk::Found, names: &HashSet<u64>, fds: &HashSet<u64>) {
        for (id, path) in &found.paths {
            self.remember(*id, path.clone());
        }
        if found.complete {
            for id in names.iter().chain(fds) {
                if !found.paths.contains_key(id) && !found.fds.contains_key(id) {
                    self.mark_gone(*id);
                }
            }
        }
    }

    fn ask(&mut self, name: Option<u64>, fd: Option<u64>) {
        if let Some(w) = self.walker.as_mut() {
            w.want_names.extend(name);
            w.want_fds.extend(fd);
        }
        self.send();
    }

    /// Hands what was asked to the walker, when it is idle.
    fn send(&mut self) {
        let Some(w) = self.walker.as_mut() else {
            return;
        };
        if w.in_flight || (w.want_names.is_empty() && w.want_fds.is_empty()) {
            return;
        }
        let names = std::mem::take(&mut w.want_names);
        let fds = std::mem::take(&mut w.want_fds);
        if w.requests.send((names, fds)).is_ok() {
            w.in_flight = true;
        }
    }
}

impl crate::events::CgroupNamer for CgroupNames<'_> {
    /// Never waits: the cache, else the file handle, else None (and the background walk asked).
    fn name_now(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cached(id) {
            return Some(p);
        }
        if self.is_gone(id) {
            return None;
        }
        if self.handles {
            return match self.cg.path_of(id) {
                Ok(Some(p)) => {
                    let s = p.to_string();
                    self.remember(id, s.clone());
                    Some(s)
                }
                Ok(None) => {
                    self.mark_gone(id);
                    None
                }
                Err(e) => {
                    debug!("cgroup id {id} has no name here: {e}");
                    None
                }
            };
        }
        self.ask(Some(id), None);
        None
    }
}

/// The daemon's background walker: one thread, one walk at a time, at most every
/// [`WALK_EVERY`].
struct Walker {
    requests: mpsc::Sender<(HashSet<u64>, HashSet<u64>)>,
    replies: mpsc::Receiver<(HashSet<u64>, HashSet<u64>, walk::Found)>,
    want_names: HashSet<u64>,
    want_fds: HashSet<u64>,
    in_flight: bool,
    /// Directories found and not yet taken.
    fds: HashMap<u64, OwnedFd>,
}

impl Walker {
    fn start(mount: std::path::PathBuf) -> Walker {
        let (requests, rx) = mpsc::channel::<(HashSet<u64>, HashSet<u64>)>();
        let (tx, replies) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("cgroup-walk".into())
            .spawn(move || {
                let mut last: Option<Instant> = None;
                while let Ok((names, fds)) = rx.recv() {
                    if let Some(t) = last {
                        std::thread::sleep(WALK_EVERY.saturating_sub(t.elapsed()));
                    }
                    last = Some(Instant::now());
                    let found = walk::walk(&mount, &names, &fds).unwrap_or_else(|e| {
                        warn!("walking the cgroup tree at {}: {e}", mount.display());
                        walk::Found::default()
                    });
                    if tx.send((names, fds, found)).is_err() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start the cgroup walker thread: {e}; cgroups are named by id only");
        }
        Walker {
            requests,
            replies,
            want_names: HashSet::new(),
            want_fds: HashSet::new(),
            in_flight: false,
            fds: HashMap::new(),
        }
    }
}

/// A path a walk found, as a cgroup path: one longer than a cgroup path may be (4,096 bytes) has
/// none, and says so (the cgroup exists).
fn parsed(cg: &Cgroup2, id: u64, path: &str) -> Result<CgroupPath, IoError> {
    path.parse().map_err(|e: super::CgroupError| {
        IoError::new(
            "name cgroup",
            cg.mount(),
            io::Error::other(format!("cgroup id {id} exists but has no cgroup path: {e}")),
        )
    })
}

/// Whether `open_by_handle_at` reaches cgroups here: the root cgroup (id 1) is tried.
fn handles_work(cg: &Cgroup2) -> bool {
    let root = match std::fs::metadata(cg.mount()) {
        Ok(m) => std::os::unix::fs::MetadataExt::ino(&m),
        Err(_) => return false,
    };
    matches!(cg.open_by_id(root), Ok(Some(fd)) if fd.as_raw_fd() >= 0)
}

/// Says at start whether cgroups are reached by file handle: without it (no
/// CAP_DAC_READ_SEARCH) every cgroup the daemon names or watches costs a walk of the tree.
pub fn check_handles(cg: &Cgroup2) {
    if handles_work(cg) {
        debug!("cgroup ids are reached by file handle (open_by_handle_at)");
    } else {
        warn!("cgroup ids cannot be reached by file handle here (open_by_handle_at needs CAP_DAC_READ_SEARCH; the shipped unit grants it): the daemon walks the cgroup tree instead, in the background, at most once a second, and log lines may name a cgroup by its id only");
    }
}
