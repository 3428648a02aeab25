//! Naming cgroup ids: by file handle (O(1)), or by one walk of the tree cached for later lookups.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use log::debug;

use super::{Cgroup2, CgroupPath};
use crate::error::IoError;

/// Entries kept at most in each cache before it is emptied.
const CACHE_MAX: usize = 65536;

/// id → path, with what it learnt cached.
pub struct CgroupNames<'a> {
    cg: &'a Cgroup2,
    cache: Option<HashMap<u64, CgroupPath>>,
    missing: HashMap<u64, Instant>,
    /// Whether id → path by file handle works here.
    handles: bool,
}

impl<'a> CgroupNames<'a> {
    pub fn new(cg: &'a Cgroup2) -> Self {
        CgroupNames {
            cg,
            cache: None,
            missing: HashMap::new(),
            handles: true,
        }
    }

    /// The path of `id` for display: `(gone, id N)` for a cgroup that no longer exists,
    /// `(id N: error)` when it cannot be told.
    pub fn name(&mut self, id: u64) -> String {
        match self.lookup(id) {
            Ok(Some(p)) => p.to_string(),
            Ok(None) => format!("(gone, id {id})"),
            Err(e) => format!("(id {id}: {e})"),
        }
    }

    /// The path of `id`: Ok(None) only when no such cgroup exists. From the cache, else from
    /// the cgroup's file handle, else (no handles here) by walking the tree again.
    pub fn lookup(&mut self, id: u64) -> Result<Option<CgroupPath>, IoError> {
        if let Some(p) = self.cache.as_ref().and_then(|c| c.get(&id)) {
            return Ok(Some(p.clone()));
        }
        if self.handles {
            match self.cg.path_of(id) {
                Ok(found) => {
                    if let Some(p) = &found {
                        let cache = self.cache.get_or_insert_with(HashMap::new);
                        if cache.len() >= CACHE_MAX {
                            cache.clear();
                        }
                        cache.insert(id, p.clone());
                    }
                    return Ok(found);
                }
                // Out of fds or memory: a failure now, not a reason to stop using handles.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
                    ) =>
                {
                    return Err(IoError::new("open_by_handle_at", self.cg.mount(), e));
                }
                Err(e) => {
                    debug!(
                        "cgroup id to path by file handle failed ({e}); walking the tree instead"
                    );
                    self.handles = false;
                }
            }
        }
        let fresh = self.cg.paths_by_id()?;
        let found = fresh.get(&id).cloned();
        self.cache = Some(fresh);
        Ok(found)
    }

    /// Drops what the cache says of `id` (a path that no longer has it: renamed, or removed).
    pub fn forget(&mut self, id: u64) {
        if let Some(c) = self.cache.as_mut() {
            c.remove(&id);
        }
    }

    /// Like [`CgroupNames::name`] for the denial log: a miss walks the tree again (a cgroup made
    /// after the last walk), but an id the walk did not find is not looked for again for
    /// `retry`, so a flood of denials from a vanished cgroup costs one walk.
    pub fn name_for_log(&mut self, id: u64, retry: Duration) -> String {
        if let Some(p) = self.cache.as_ref().and_then(|c| c.get(&id)) {
            return p.to_string();
        }
        if let Some(t) = self.missing.get(&id) {
            if t.elapsed() < retry {
                return format!("(gone, id {id})");
            }
        }
        match self.lookup(id) {
            Ok(Some(p)) => {
                self.missing.remove(&id);
                p.to_string()
            }
            Ok(None) => {
                if self.missing.len() > 4096 {
                    self.missing.clear();
                }
                self.missing.insert(id, Instant::now());
                format!("(gone, id {id})")
            }
            Err(e) => format!("(id {id}: {e})"),
        }
    }
}
