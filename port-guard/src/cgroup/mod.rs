//! cgroup v2: finding the mount, validated cgroup paths, ids (the directory's inode number, which
//! is what `bpf_get_current_cgroup_id` returns), and mapping ids back to paths.

use std::{
    collections::HashMap,
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    str::FromStr,
};

/// A cgroup problem.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A path that is not an absolute, normalised cgroup path.
    #[error("invalid cgroup path {path:?}: {reason}")]
    Invalid { path: String, reason: &'static str },
    /// A valid path that names no cgroup.
    #[error("cgroup {path} does not exist (looked for {dir})")]
    Missing { path: CgroupPath, dir: PathBuf },
    /// No cgroup2 filesystem in /proc/self/mountinfo.
    #[error("no cgroup2 filesystem is mounted (checked /proc/self/mountinfo); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup`")]
    NoMount,
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CgroupError {
    /// Bad input (exit 2) rather than a runtime failure (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            CgroupError::Invalid { .. } | CgroupError::Missing { .. }
        )
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A cgroup path as in the `0::` line of /proc/PID/cgroup: `/` or `/a/b`, no `.`/`..`, no empty
/// components, no NUL, UTF-8, each component at most 255 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct CgroupPath(String);

impl CgroupPath {
    pub fn root() -> CgroupPath {
        CgroupPath("/".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Components below the root.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// The cgroup's level: 0 for the root.
    pub fn level(&self) -> u32 {
        self.components().count() as u32
    }

    /// The parent cgroup; None for the root.
    pub fn parent(&self) -> Option<CgroupPath> {
        if self.0 == "/" {
            return None;
        }
        match self.0.rfind('/') {
            Some(0) => Some(CgroupPath::root()),
            Some(i) => Some(CgroupPath(self.0[..i].to_owned())),
            None => None,
        }
    }

    /// `self/name`, validated.
    pub fn join(&self, name: &str) -> Result<CgroupPath, CgroupError> {
        if self.0 == "/" {
            format!("/{name}").parse()
        } else {
            format!("{}/{name}", self.0).parse()
        }
    }

    /// Whether `self` is `other` or below it.
    pub fn is_within(&self, other: &CgroupPath) -> bool {
        other.0 == "/" || self.0 == other.0 || self.0.starts_with(&format!("{}/", other.0))
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for CgroupPath {
    type Err = CgroupError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| CgroupError::Invalid {
            path: s.to_owned(),
            reason,
        };
        if !s.starts_with('/') {
            return Err(invalid(
                "must start with '/' (relative to the cgroup2 mount)",
            ));
        }
        if s.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        if s.len() > 4096 {
            return Err(invalid("longer than 4096 bytes"));
        }
        if s == "/" {
            return Ok(CgroupPath::root());
        }
        let trimmed = s.strip_suffix('/').unwrap_or(s);
        for c in trimmed[1..].split('/') {
            match c {
                "" => return Err(invalid("has an empty component ('//')")),
                "." | ".." => return Err(invalid("'.' and '..' components are not allowed")),
                c if c.len() > 255 => return Err(invalid("a component is longer than 255 bytes")),
                _ => {}
            }
        }
        Ok(CgroupPath(trimmed.to_owned()))
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
        let text = fs::read_to_string(info).map_err(io_err("read", info))?;
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
            Err(e) => Err(io_err("stat", &dir)(e)),
        }
    }

    /// Creates `path` and its missing parents; returns its id.
    pub fn create(&self, path: &CgroupPath) -> Result<u64, CgroupError> {
        let dir = self.dir(path);
        fs::create_dir_all(&dir).map_err(io_err("create cgroup", &dir))?;
        self.id(path)
    }

    /// The path of the cgroup with id `id`, from its file handle (cgroupfs exports the id as a
    /// kernfs handle): O(1) whatever the size of the tree. Ok(None) when no such cgroup exists;
    /// an error when handles cannot be used here (no CAP_DAC_READ_SEARCH, an old kernel), where
    /// [`Cgroup2::paths_by_id`] remains.
    pub fn path_of(&self, id: u64) -> io::Result<Option<CgroupPath>> {
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
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let target = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let Ok(rel) = target.strip_prefix(&self.mount) else {
            // Reached through another mount of cgroup2: fall back to the walk.
            return Err(io::Error::other(format!(
                "{} is not below {}",
                target.display(),
                self.mount.display()
            )));
        };
        let Some(rel) = rel.to_str() else {
            return Ok(None);
        };
        if rel.ends_with(" (deleted)") {
            return Ok(None);
        }
        Ok(format!("/{rel}").parse().ok())
    }

    /// Every cgroup below the mount, by id. Walks the tree: call it when an id is not in a cache.
    pub fn paths_by_id(&self) -> HashMap<u64, CgroupPath> {
        let mut out = HashMap::new();
        let mut stack = vec![(self.mount.clone(), CgroupPath::root())];
        while let Some((dir, path)) = stack.pop() {
            if let Ok(m) = fs::symlink_metadata(&dir) {
                out.insert(m.ino(), path.clone());
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                if !ft.is_dir() {
                    continue;
                }
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if let Ok(child) = path.join(&name) {
                    stack.push((entry.path(), child));
                }
            }
        }
        out
    }
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
    fn parents() {
        let p = |s: &str| s.parse::<CgroupPath>().unwrap();
        assert_eq!(p("/machine/qemu-1").parent(), Some(p("/machine")));
        assert_eq!(p("/machine").parent(), Some(CgroupPath::root()));
        assert_eq!(CgroupPath::root().parent(), None);
    }

    #[test]
    fn validates_paths() {
        assert_eq!("/".parse::<CgroupPath>().unwrap().level(), 0);
        let p: CgroupPath = "/machine.slice/qemu-1/".parse().unwrap();
        assert_eq!(p.as_str(), "/machine.slice/qemu-1");
        assert_eq!(p.level(), 2);
        for bad in [
            "",
            "machine.slice",
            "/a/../b",
            "/a/./b",
            "/a//b",
            "/..",
            "/a\0b",
        ] {
            let e = bad.parse::<CgroupPath>().unwrap_err();
            assert!(e.is_usage());
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(format!("/{}", "x".repeat(256))
            .parse::<CgroupPath>()
            .is_err());
    }

    #[test]
    fn joins_and_nests() {
        let root = CgroupPath::root();
        let a = root.join("a").unwrap();
        let b = a.join("b").unwrap();
        assert_eq!(b.as_str(), "/a/b");
        assert!(b.is_within(&a) && b.is_within(&root) && a.is_within(&a));
        assert!(!"/ab".parse::<CgroupPath>().unwrap().is_within(&a));
        assert!(a.join("..").is_err());
    }

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
