//! cgroup v2: finding the mount, validated cgroup paths ([`CgroupPath`]), ids (the directory's
//! inode number, which is what `bpf_get_current_cgroup_id` returns), and mapping ids back to
//! paths ([`CgroupNames`]).
//!
//! Absence is reported only on evidence: `ENOENT` (or a stale handle) says a cgroup is gone;
//! any other failure (EMFILE, EACCES, ...) is an error the caller must not take for "gone".

mod names;
mod path;
mod walk;

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

pub use names::{check_handles, CgroupNames, Reached};
pub use path::CgroupPath;
use port_guard_common::MAX_CGROUP_LEVEL;

use crate::error::{IoContext as _, IoError};

/// A cgroup problem.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A path that is not an absolute, normalised cgroup path.
    #[error("invalid cgroup path {path:?}: {reason}")]
    Invalid { path: String, reason: &'static str },
    /// A valid path that names no cgroup.
    #[error("cgroup {path} does not exist (looked for {dir})")]
    Missing { path: CgroupPath, dir: PathBuf },
    /// A cgroup below the deepest level the guard's programs walk.
    #[error("cgroup {0} is deeper than level {MAX_CGROUP_LEVEL}, the deepest the guard checks")]
    TooDeep(CgroupPath),
    /// No cgroup2 filesystem in /proc/self/mountinfo.
    #[error("no cgroup2 filesystem is mounted (checked /proc/self/mountinfo); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup`")]
    NoMount,
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl CgroupError {
    /// Bad input (exit 2) rather than a runtime failure (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            CgroupError::Invalid { .. } | CgroupError::Missing { .. } | CgroupError::TooDeep(_)
        )
    }
}

/// The cgroup2 filesystem this host uses.
#[derive(Clone, Debug)]
pub struct Cgroup2 {
    mount: PathBuf,
}

impl Cgroup2 {
    /// Finds the cgroup2 mount in /proc/self/mountinfo (hybrid hosts mount it at
    /// /sys/fs/cgroup/unified).
    pub fn find() -> Result<Cgroup2, CgroupError> {
        let info = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(info).at("read", info)?;
        parse_mountinfo(&text)
            .map(|mount| Cgroup2 { mount })
            .ok_or(CgroupError::NoMount)
    }

    pub fn at(mount: PathBuf) -> Cgroup2 {
        Cgroup2 { mount }
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The directory of `path`.
    pub fn dir(&self, path: &CgroupPath) -> PathBuf {
        let mut dir = self.mount.clone();
        for c in path.components() {
            dir.push(c);
        }
        dir
    }

    /// The id of an existing cgroup, or [`CgroupError::Missing`]. Symlinks are not followed: a
    /// cgroup2 tree has none, so one here is not a cgroup.
    pub fn id(&self, path: &CgroupPath) -> Result<u64, CgroupError> {
        let dir = self.dir(path);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(m.ino()),
            Ok(_) => Err(CgroupError::Missing {
                path: path.clone(),
                dir,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CgroupError::Missing {
                path: path.clone(),
                dir,
            }),
            Err(e) => Err(IoError::new("stat", dir, e).into()),
        }
    }

    /// Creates `path` and its missing parents; returns its id.
    pub fn create(&self, path: &CgroupPath) -> Result<u64, CgroupError> {
        let dir = self.dir(path);
        fs::create_dir_all(&dir).at("create cgroup", &dir)?;
        self.id(path)
    }

    /// Whether `path` has processes (`populated` in its `cgroup.events`): Ok(None) only when the
    /// cgroup is gone (ENOENT, or ENODEV for a file of a cgroup removed while open).
    pub fn populated(&self, path: &CgroupPath) -> Result<Option<bool>, IoError> {
        let file = self.dir(path).join("cgroup.events");
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENODEV) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(IoError::new("read", file, e)),
        };
        match text.lines().find_map(|l| l.strip_prefix("populated ")) {
            Some(v) => Ok(Some(v.trim() == "1")),
            None => Err(IoError::new(
                "parse",
                file,
                io::Error::new(io::ErrorKind::InvalidData, "no `populated` line"),
            )),
        }
    }

    /// The CPU time spent in `path` and below so far (`cpu.stat` usage_usec, kept by the core
    /// on every cgroup v2): it grows whenever a process runs there, even one that came and went
    /// between two looks at `cgroup.events`.
    pub fn cpu_usec(&self, path: &CgroupPath) -> Result<u64, IoError> {
        let file = self.dir(path).join("cpu.stat");
        let text = fs::read_to_string(&file).map_err(|e| IoError::new("read", file.clone(), e))?;
        text.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                IoError::new(
                    "parse",
                    file,
                    io::Error::new(io::ErrorKind::InvalidData, "no `usage_usec` line"),
                )
            })
    }

    /// The directory of the cgroup with id `id`, from its file handle (cgroupfs exports the id
    /// as a kernfs handle): O(1) whatever the size of the tree. Ok(None) when no such cgroup
    /// exists; an error when handles cannot be used here (no CAP_DAC_READ_SEARCH, an old
    /// kernel).
    pub fn open_by_id(&self, id: u64) -> io::Result<Option<std::os::fd::OwnedFd>> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: u32,
            handle_type: i32,
            id: u64,
        }
        /// FILEID_KERNFS in include/linux/exportfs.h.
        const FILEID_KERNFS: i32 = 0xfe;
        let mount = fs::File::open(&self.mount)?;
        let handle = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id,
        };
        // SAFETY: a valid dir fd and a file_handle with 8 bytes of f_handle.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                mount.as_raw_fd(),
                &handle as *const KernfsHandle,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESTALE) | Some(libc::ENOENT) | Some(libc::ENOTDIR) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: a fresh fd nothing else owns.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// The path of the cgroup with id `id`, from its file handle and the fd's link. Ok(None)
    /// when no such cgroup exists; an error when handles cannot be used here, or when its path
    /// is longer than PATH_MAX (it exists, but has no name this way).
    pub fn path_of(&self, id: u64) -> io::Result<Option<CgroupPath>> {
        let Some(fd) = self.open_by_id(id)? else {
            return Ok(None);
        };
        self.path_of_fd(&fd)
    }

    /// The path of the cgroup directory `fd` (see [`Cgroup2::path_of`]).
    pub fn path_of_fd(&self, fd: &std::os::fd::OwnedFd) -> io::Result<Option<CgroupPath>> {
        use std::os::fd::AsRawFd as _;
        let target = match fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
            Ok(t) => t,
            Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                return Err(io::Error::other("its path is longer than PATH_MAX"))
            }
            Err(e) => return Err(e),
        };
        let Ok(rel) = target.strip_prefix(&self.mount) else {
            return Err(io::Error::other(format!(
                "{} is not below {}",
                target.display(),
                self.mount.display()
            )));
        };
        let Some(rel) = rel.to_str() else {
            return Err(io::Error::other("its path is not UTF-8"));
        };
        if rel.ends_with(" (deleted)") {
            return Ok(None);
        }
        Ok(format!("/{rel}").parse().ok())
    }
}

/// What a cgroup's `cgroup.events` says, read through its directory fd: Ok(None) only when the
/// cgroup is gone (ENOENT or ENODEV: removed while held), else whether it has processes.
pub fn populated_at(dir: &std::os::fd::OwnedFd) -> io::Result<Option<bool>> {
    let text = match read_at(dir, "cgroup.events") {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    match text.lines().find_map(|l| l.strip_prefix("populated ")) {
        Some(v) => Ok(Some(v.trim() == "1")),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "cgroup.events has no `populated` line",
        )),
    }
}

/// The CPU time spent in the cgroup `dir` and below (`cpu.stat` usage_usec).
pub fn cpu_usec_at(dir: &std::os::fd::OwnedFd) -> io::Result<u64> {
    read_at(dir, "cpu.stat")?
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no `usage_usec` line"))
}

/// The id (inode) of the cgroup directory `dir`, and of its parent.
pub fn ids_at(dir: &std::os::fd::OwnedFd) -> io::Result<(u64, u64)> {
    use std::os::fd::AsRawFd as _;
    let me = fs::metadata(format!("/proc/self/fd/{}", dir.as_raw_fd()))?.ino();
    let parent = fs::metadata(format!("/proc/self/fd/{}/..", dir.as_raw_fd()))?.ino();
    Ok((me, parent))
}

/// Reads the file `name` of the cgroup directory `dir` (openat, never through a link).
fn read_at(dir: &std::os::fd::OwnedFd, name: &str) -> io::Result<String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: a valid dir fd and C string.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let f = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    io::read_to_string(f)
}

/// The mount point of the first cgroup2 filesystem in a mountinfo text.
fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup path of a process, from the `0::` line of /proc/PID/cgroup.
pub fn of_pid(pid: u32) -> Option<CgroupPath> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .and_then(|p| p.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_mountinfo() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/un\\040ified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(text),
            Some(PathBuf::from("/sys/fs/cgroup/un ified"))
        );
        assert_eq!(
            parse_mountinfo("31 23 0:28 / /x rw - tmpfs tmpfs rw\n"),
            None
        );
    }
}
