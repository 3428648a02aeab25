//! A lessee cgroup as the reaper holds it: its directory, open, and what it is looked at for.

use std::os::fd::OwnedFd;

use log::{info, warn};

use crate::{
    cgroup::{self, Cgroup2, CgroupNames, CgroupPath, Reached},
    error::IoError,
};

/// What looking at a lessee found.
pub(super) enum Looked {
    /// No cgroup has its id any more.
    Gone,
    /// It has processes.
    Populated,
    /// It has none.
    Empty,
    /// Not reached yet (the background walk was asked): looked at again next tick.
    Pending,
    /// It could not be looked at (no evidence either way): looked at again next tick.
    Failed(IoError),
}

/// A lessee cgroup, open.
pub(super) struct Lessee {
    pub id: u64,
    pub dir: OwnedFd,
    /// Its parent's id.
    pub parent: u64,
    /// Made by `spawn` (a direct child of the spawn parent): it ends with its VM.
    pub spawned: bool,
}

impl Lessee {
    /// The cgroup `id`, reached by its id: Ok(None) when it is gone.
    pub(super) fn reach(
        id: u64,
        names: &mut CgroupNames<'_>,
        spawn_parent: Option<u64>,
    ) -> Result<Option<Lessee>, Looked> {
        let dir = match names.reach(id) {
            Ok(Reached::Dir(fd)) => fd,
            Ok(Reached::Gone) => return Ok(None),
            Ok(Reached::Pending) => return Err(Looked::Pending),
            Err(e) => return Err(Looked::Failed(e)),
        };
        Lessee::from_dir(id, dir, spawn_parent).map(Some)
    }

    fn from_dir(id: u64, dir: OwnedFd, spawn_parent: Option<u64>) -> Result<Lessee, Looked> {
        match cgroup::ids_at(&dir) {
            Ok((me, parent)) if me == id => Ok(Lessee {
                id,
                dir,
                parent,
                spawned: spawn_parent == Some(parent),
            }),
            Ok((me, _)) => Err(Looked::Failed(IoError::new(
                "open cgroup",
                std::path::Path::new("/"),
                std::io::Error::other(format!("cgroup id {id} opened as id {me}")),
            ))),
            // Removed between the open and the look.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Looked::Gone),
            Err(e) => Err(Looked::Failed(IoError::new(
                "stat cgroup",
                std::path::Path::new("/"),
                e,
            ))),
        }
    }

    /// A child of the spawn parent, opened by its (short, root-made) path: Ok(None) when it is
    /// gone already.
    pub(super) fn open_spawned(cg: &Cgroup2, path: &CgroupPath) -> std::io::Result<Option<Lessee>> {
        let dir = cg.dir(path);
        let f = match std::fs::File::open(&dir) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let fd = OwnedFd::from(f);
        let (id, parent) = cgroup::ids_at(&fd)?;
        Ok(Some(Lessee {
            id,
            dir: fd,
            parent,
            spawned: true,
        }))
    }

    /// Whether it is gone, populated or empty, through its directory.
    pub(super) fn look(&self) -> Result<Looked, Looked> {
        match cgroup::populated_at(&self.dir) {
            Ok(None) => Ok(Looked::Gone),
            Ok(Some(true)) => Ok(Looked::Populated),
            Ok(Some(false)) => Ok(Looked::Empty),
            Err(e) => Err(Looked::Failed(IoError::new(
                "read cgroup.events of cgroup",
                std::path::Path::new(&format!("id {}", self.id)),
                e,
            ))),
        }
    }

    /// Its CPU time so far, if it can be read.
    pub(super) fn cpu_usec(&self) -> Option<u64> {
        cgroup::cpu_usec_at(&self.dir).ok()
    }

    /// Removes a spawned cgroup whose VM ended.
    pub(super) fn remove_spawned(&self, cg: &Cgroup2, spawn_parent: &CgroupPath) {
        let Ok(Some(path)) = cg.path_of_fd(&self.dir) else {
            return;
        };
        if !crate::leases::is_spawned(&path, spawn_parent) {
            return;
        }
        let shown = crate::logfmt::value(path.as_str()).into_owned();
        match std::fs::remove_dir(cg.dir(&path)) {
            Ok(()) => info!("removed cgroup {shown}"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("removing cgroup {shown}: {e}"),
        }
    }
}
