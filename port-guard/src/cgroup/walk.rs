//! One walk of the cgroup tree that finds ids: their paths, or a directory fd of each.
//!
//! Everything is relative to directory fds (`openat`, `fstatat`), so a path longer than
//! PATH_MAX (which a user can build in a delegated subtree) costs nothing special: its cgroups
//! are found like the others. A directory that cannot be read is skipped and the walk says it
//! was incomplete (then not finding an id is no evidence that it is gone); the depth is bounded.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::Path,
    rc::Rc,
};

/// Deepest level walked (the root is 0). Deeper cgroups are not found, and the walk says so.
pub const MAX_WALK_DEPTH: usize = 256;

/// What a walk found.
#[derive(Debug, Default)]
pub struct Found {
    /// id → path (relative to the mount, `/a/b`), for the ids asked by name.
    pub paths: HashMap<u64, String>,
    /// id → its directory, for the ids asked by fd.
    pub fds: HashMap<u64, OwnedFd>,
    /// Every directory was read: an id not found does not exist.
    pub complete: bool,
}

/// A directory still to be listed.
struct Dir {
    fd: OwnedFd,
    path: Rc<str>,
    depth: usize,
}

/// Opens `name` below `parent` as a directory, never through a link.
fn open_at(parent: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<OwnedFd> {
    let c = CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid dir fd and C string.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How many subdirectories `name` below `parent` has: cgroupfs (kernfs) keeps a directory's
/// link count at 2 + its subdirectories, so a leaf cgroup is known without opening it.
fn subdirs_at(parent: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<u64> {
    let c = CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a zeroed stat is a valid buffer for fstatat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid dir fd, C string and stat buffer.
    if unsafe {
        libc::fstatat(
            parent.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_nlink.saturating_sub(2))
}

/// Walks the tree at `mount` for `names` (paths wanted) and `fds` (directories wanted). Stops
/// early once every id was found. The id of each cgroup comes from its parent's listing (the
/// entry's inode number), and only directories that have subdirectories are opened and read:
/// a walk costs one listing per parent and one `fstatat` per leaf.
pub fn walk(mount: &Path, names: &HashSet<u64>, fds: &HashSet<u64>) -> io::Result<Found> {
    let mut w = Walk {
        names,
        fds,
        found: Found {
            complete: true,
            ..Found::default()
        },
        stack: Vec::new(),
    };
    w.start(mount)?;
    let wanted = names.len() + fds.len();
    while let Some(dir) = w.stack.pop() {
        if wanted > 0 && w.found.paths.len() + w.found.fds.len() == wanted {
            break;
        }
        let Some(entries) = w.list(&dir) else {
            continue;
        };
        for entry in entries {
            let Ok(entry) = entry else {
                w.found.complete = false;
                break;
            };
            w.visit(&dir, &entry);
        }
    }
    Ok(w.found)
}

/// One walk under way: what it looks for, what it found, what it has still to list.
struct Walk<'a> {
    /// Ids whose paths are wanted.
    names: &'a HashSet<u64>,
    /// Ids whose directories are wanted.
    fds: &'a HashSet<u64>,
    found: Found,
    /// Directories to list, each with its fd, path and depth.
    stack: Vec<Rc<Dir>>,
}

impl Walk<'_> {
    /// The root: opened, found if it is wanted, and the first directory to list.
    fn start(&mut self, mount: &Path) -> io::Result<()> {
        let root = open_root(mount)?;
        let root_id = fs::metadata(mount)?.ino();
        if self.names.contains(&root_id) {
            self.found.paths.insert(root_id, "/".into());
        }
        if self.fds.contains(&root_id) {
            self.found.fds.insert(root_id, root.try_clone()?);
        }
        self.stack.push(Rc::new(Dir {
            fd: root,
            path: Rc::from(""),
            depth: 0,
        }));
        Ok(())
    }

    /// The listing of `dir`; None when it cannot be read (the walk is then incomplete) or was
    /// removed since it was listed.
    fn list(&mut self, dir: &Dir) -> Option<fs::ReadDir> {
        match fs::read_dir(format!("/proc/self/fd/{}", dir.fd.as_raw_fd())) {
            Ok(e) => Some(e),
            // Removed since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(_) => {
                self.found.complete = false;
                None
            }
        }
    }

    /// One entry of `dir`'s listing: a subdirectory is found if its id is wanted, and opened
    /// (never when it is a leaf that is not wanted by fd) to be handed over or listed in turn.
    fn visit(&mut self, dir: &Dir, entry: &fs::DirEntry) {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            return;
        }
        let id = std::os::unix::fs::DirEntryExt::ino(entry);
        let name = entry.file_name();
        let path = || format!("{}/{}", dir.path, name.to_string_lossy());
        if self.names.contains(&id) {
            self.found.paths.insert(id, path());
        }
        let want_fd = self.fds.contains(&id);
        let Some(subdirs) = self.or_incomplete(subdirs_at(&dir.fd, &name)) else {
            return;
        };
        if !want_fd && subdirs == 0 {
            return;
        }
        if subdirs > 0 && dir.depth + 1 >= MAX_WALK_DEPTH {
            self.found.complete = false;
        }
        let Some(fd) = self.or_incomplete(open_at(&dir.fd, &name)) else {
            return;
        };
        if want_fd {
            match fd.try_clone() {
                Ok(f) => {
                    self.found.fds.insert(id, f);
                }
                Err(_) => self.found.complete = false,
            }
        }
        if subdirs > 0 && dir.depth + 1 < MAX_WALK_DEPTH {
            self.stack.push(Rc::new(Dir {
                fd,
                path: Rc::from(path()),
                depth: dir.depth + 1,
            }));
        }
    }

    /// What a call on an entry gave; None when it failed: an entry removed since the listing
    /// is no loss, any other failure leaves the walk incomplete.
    fn or_incomplete<T>(&mut self, r: io::Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(_) => {
                self.found.complete = false;
                None
            }
        }
    }
}

/// Opens the mount itself as a directory.
fn open_root(mount: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(mount.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid C string.
    let root = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if root < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(root) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ino(fd: &OwnedFd) -> io::Result<u64> {
        fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).map(|m| m.ino())
    }

    /// A directory tree stands in for cgroupfs: a chain longer than PATH_MAX is walked like any.
    #[test]
    fn finds_paths_and_fds_below_a_chain_longer_than_path_max() {
        let base = std::env::temp_dir().join(format!("pg-walk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir(&base).unwrap();
        let base_fd = {
            let c = CString::new(base.as_os_str().as_bytes()).unwrap();
            // SAFETY: valid C string.
            unsafe {
                OwnedFd::from_raw_fd(libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY))
            }
        };
        // 20 levels of 240-byte names: 4,820 bytes below the base.
        let name = "x".repeat(240);
        let mut fd = base_fd.try_clone().unwrap();
        for _ in 0..20 {
            let c = CString::new(name.as_str()).unwrap();
            // SAFETY: valid dir fd and C string.
            assert_eq!(
                unsafe { libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), 0o755) },
                0
            );
            fd = open_at(&fd, std::ffi::OsStr::new(&name)).unwrap();
        }
        let deep = ino(&fd).unwrap();
        fs::create_dir(base.join("short")).unwrap();
        let short = fs::metadata(base.join("short")).unwrap().ino();
        let names: HashSet<u64> = [deep, short].into();
        let fds: HashSet<u64> = [deep].into();
        let found = walk(&base, &names, &fds).unwrap();
        assert_eq!(found.paths[&short], "/short");
        assert_eq!(found.paths[&deep].len(), 20 * 241);
        assert_eq!(ino(&found.fds[&deep]).unwrap(), deep);
        // Not there: a complete walk says so.
        let none = walk(&base, &[1u64 << 40].into(), &HashSet::new()).unwrap();
        assert!(none.complete && none.paths.is_empty());
        std::process::Command::new("rm")
            .arg("-rf")
            .arg(&base)
            .status()
            .unwrap();
    }
}
