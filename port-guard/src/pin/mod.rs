//! The pin directory: where the guard's maps and links live on bpffs between daemons, and what
//! makes it trustworthy.
//!
//! Whoever controls the pin dir controls the guard: removing `link_bind4` detaches it, and a
//! bpffs mounted without `mode=` is world-writable (1777), so anyone may create a directory
//! there first. So a pin dir is used only when:
//! - its path is absolute and every component is reached without following a symbolic link
//!   (walked with `openat(O_PATH | O_NOFOLLOW)` from `/`);
//! - every ancestor is owned by root and writable by nobody else unless it is sticky (in a
//!   sticky directory nobody else can rename or remove root's entries), and the pin dir itself is
//!   owned by root and writable by nobody else;
//! - it is on a bpffs that the host's initial mount namespace sees: a bpffs mounted only in a
//!   private mount namespace dies with it, and the guard's pins with it.
//!
//! The daemon creates missing components itself (root, 0700), and mounts bpffs on
//! `/sys/fs/bpf` with `mode=0700` when nothing is mounted there, but only in the host's
//! initial mount namespace ([`host`]).

mod host;

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Component, Path, PathBuf},
};

use port_guard_common::{
    MAP_CONFIG, PROG_BIND4, PROG_BIND6, PROG_POST_BIND4, PROG_POST_BIND6, PROG_RELEASE,
};

use self::host::{host_mount_namespace, mount_bpffs, visible_to_host};
use crate::error::{IoContext as _, IoError};

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/port-guard";
/// Where bpffs is mounted by convention (systemd mounts it at boot, with mode 0700).
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Pin names of the two links, under the pin dir.
pub const LINKS: [(&str, &str); 2] = [(PROG_BIND4, "link_bind4"), (PROG_BIND6, "link_bind6")];
/// Pin names of the post_bind links, there only while refusals go through the sentinel port.
pub const POST_LINKS: [(&str, &str); 2] = [
    (PROG_POST_BIND4, "link_post_bind4"),
    (PROG_POST_BIND6, "link_post_bind6"),
];
/// Pin name of the sock_release link, which uncharges the sockets counted in the per-child
/// shares (always attached: it costs one lookup per socket while no range has a limit).
pub const RELEASE_LINKS: [(&str, &str); 1] = [(PROG_RELEASE, "link_release")];
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A pin dir problem (runtime: exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// Nothing is pinned at the pin dir.
    #[error("no guard is loaded at {0} (nothing pinned there)")]
    NotLoaded(PathBuf),
    /// Another daemon holds the pin dir (its pid, when its record names a live process).
    #[error("another port-guard daemon{} is running on {}: stop it first (`systemctl stop port-guard`, or kill that pid)", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), .dir.display())]
    Busy { dir: PathBuf, pid: Option<u32> },
    /// A relative pin dir.
    #[error("pin dir {0} must be an absolute path (e.g. {DEFAULT_PIN_DIR})")]
    Relative(PathBuf),
    /// The pin dir is not on a bpf filesystem and cannot be put on one.
    #[error("pin dir {0} is not on a bpf filesystem; mount one (`mount -t bpf -o mode=0700 bpf {1}`) or choose a pin dir under {BPFFS_ROOT}")]
    NotBpffs(PathBuf, PathBuf),
    /// A component of the pin path is a symbolic link.
    #[error("pin dir {path}: {link} is a symbolic link; a pin path must be reached without following links (remove it)")]
    Symlink { path: PathBuf, link: PathBuf },
    /// A component of the pin path is not a directory.
    #[error("pin dir {path}: {component} is not a directory")]
    NotDirectory { path: PathBuf, component: PathBuf },
    /// A directory on the way is not root's alone.
    #[error("pin dir {path}: {dir} is owned by uid {uid} with mode {mode:04o}; only directories owned by root that nobody else can write are trusted with the guard's pins (inspect it, then remove it: `rm -r {dir}`)")]
    Untrusted {
        path: PathBuf,
        dir: PathBuf,
        uid: u32,
        mode: u32,
    },
    /// The pins cannot be reached by this user.
    #[error("the guard's pins at {0} are root's: permission denied (run this as root)")]
    NeedsRoot(PathBuf),
    /// The bpffs is not visible from the host's initial mount namespace.
    #[error("pin dir {path} is on a bpffs the host's initial mount namespace does not see ({why}); pins there vanish with this mount namespace: mount bpffs on the host (`mount -t bpf -o mode=0700 bpf {BPFFS_ROOT}`; systemd does it at boot) and run the daemon where that mount is visible")]
    NotVisible { path: PathBuf, why: String },
    /// A filesystem or syscall failure.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl PinError {
    /// Bad input (exit 2) rather than a runtime failure (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, PinError::Relative(_))
    }
}

/// The pin directory.
#[derive(Clone, Debug)]
pub struct PinDir(PathBuf);

/// What walking the pin path found.
struct Walk {
    /// The deepest existing component (O_PATH), and its path.
    fd: OwnedFd,
    at: PathBuf,
    /// Components below `at` that do not exist yet.
    missing: Vec<PathBuf>,
}

impl PinDir {
    pub fn new(path: impl Into<PathBuf>) -> PinDir {
        PinDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn present(&self, name: &str) -> bool {
        fs::symlink_metadata(self.file(name)).is_ok()
    }

    /// Whether both links are pinned.
    pub fn has_links(&self) -> bool {
        LINKS.iter().all(|(_, l)| self.present(l))
    }

    /// Whether anything of a guard is pinned here.
    pub fn exists(&self) -> bool {
        self.present(MAP_CONFIG) || LINKS.iter().any(|(_, l)| self.present(l))
    }

    /// Completes what a daemon killed while pinning left: a `_new` link pin (attached, newer)
    /// replaces the final one, or takes its place when it is missing. Returns what it did.
    pub fn recover(&self) -> Vec<String> {
        let mut done = Vec::new();
        for (_, link_name) in LINKS.iter().chain(&POST_LINKS).chain(&RELEASE_LINKS) {
            let staged = self.file(&format!("{link_name}_new"));
            if fs::symlink_metadata(&staged).is_ok()
                && fs::rename(&staged, self.file(link_name)).is_ok()
            {
                done.push(format!(
                    "{link_name}: took over the link an interrupted start had pinned"
                ));
            }
        }
        done
    }

    /// Walks the pin path from `/` without following links, checking ownership on the way.
    fn walk(&self) -> Result<Walk, PinError> {
        if !self.0.is_absolute() {
            return Err(PinError::Relative(self.0.clone()));
        }
        let root = Path::new("/");
        let mut fd = open_path(None, root).at("open", root)?;
        let mut at = PathBuf::from("/");
        let mut components: Vec<&std::ffi::OsStr> = Vec::new();
        for c in self.0.components() {
            match c {
                Component::RootDir => {}
                Component::Normal(n) => components.push(n),
                // `.` and `..` would make "reached without following a link" meaningless.
                _ => {
                    return Err(PinError::NotDirectory {
                        path: self.0.clone(),
                        component: self.0.clone(),
                    })
                }
            }
        }
        let last = components.len();
        for (i, name) in components.iter().enumerate() {
            let next = at.join(name);
            let child = match open_path(Some(&fd), Path::new(name)) {
                Ok(child) => child,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let mut missing = Vec::new();
                    let mut p = at.clone();
                    for n in &components[i..] {
                        p.push(n);
                        missing.push(p.clone());
                    }
                    return Ok(Walk { fd, at, missing });
                }
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(PinError::NeedsRoot(self.0.clone()))
                }
                Err(e) => return Err(IoError::new("open", next, e).into()),
            };
            let st = fstat(&child).at("stat", &next)?;
            let kind = st.st_mode & libc::S_IFMT;
            if kind == libc::S_IFLNK {
                return Err(PinError::Symlink {
                    path: self.0.clone(),
                    link: next,
                });
            }
            if kind != libc::S_IFDIR {
                return Err(PinError::NotDirectory {
                    path: self.0.clone(),
                    component: next,
                });
            }
            let perm = st.st_mode & 0o7777;
            let others_write = perm & 0o022 != 0;
            let sticky = perm & libc::S_ISVTX != 0;
            // The pin dir itself: root's alone. An ancestor: root's, and sticky if others may
            // write it (they cannot rename or remove root's entries then).
            let trusted = st.st_uid == 0 && (!others_write || (i + 1 < last && sticky));
            if !trusted {
                return Err(PinError::Untrusted {
                    path: self.0.clone(),
                    dir: next,
                    uid: st.st_uid,
                    mode: perm,
                });
            }
            fd = child;
            at = next;
        }
        Ok(Walk {
            fd,
            at,
            missing: Vec::new(),
        })
    }

    /// Checks that the pin dir exists and may be trusted: every command that reads or writes the
    /// pins calls this first.
    pub fn verify(&self) -> Result<(), PinError> {
        let walk = self.walk()?;
        if !walk.missing.is_empty() {
            return Err(PinError::NotLoaded(self.0.clone()));
        }
        Ok(())
    }

    /// For the daemon, before anything is loaded: whether [`PinDir::prepare`] can succeed here,
    /// without creating or mounting anything (so a refusal is the one line on stderr).
    pub fn preflight(&self) -> Result<(), PinError> {
        let walk = self.walk()?;
        if is_bpffs(&walk.fd).at("statfs", &walk.at)? {
            return visible_to_host(&walk.fd, &walk.at).map_err(|why| PinError::NotVisible {
                path: self.0.clone(),
                why,
            });
        }
        if walk.at != Path::new(BPFFS_ROOT) {
            return Err(PinError::NotBpffs(self.0.clone(), walk.at));
        }
        host_mount_namespace().map_err(|why| PinError::NotVisible {
            path: self.0.clone(),
            why: format!("nothing is mounted on {BPFFS_ROOT} here, and {why}"),
        })
    }

    /// For the daemon: makes sure the pin dir is on a bpffs the host sees (mounting
    /// /sys/fs/bpf with mode 0700 when nothing is mounted there and this is the host's mount
    /// namespace) and exists, owned by root, mode 0700. Returns whether bpffs was mounted.
    pub fn prepare(&self) -> Result<bool, PinError> {
        let mut walk = self.walk()?;
        let mut mounted = false;
        if !is_bpffs(&walk.fd).at("statfs", &walk.at)? {
            let root = Path::new(BPFFS_ROOT);
            // Only /sys/fs/bpf itself is ever mounted on: the deepest existing component of a
            // pin path below it, reached by the walk without a link.
            if walk.at != root {
                return Err(PinError::NotBpffs(self.0.clone(), walk.at));
            }
            if let Err(why) = host_mount_namespace() {
                return Err(PinError::NotVisible {
                    path: self.0.clone(),
                    why: format!("nothing is mounted on {BPFFS_ROOT} here, and {why}"),
                });
            }
            mount_bpffs(root)?;
            mounted = true;
            walk = self.walk()?;
        } else if let Err(why) = visible_to_host(&walk.fd, &walk.at) {
            return Err(PinError::NotVisible {
                path: self.0.clone(),
                why,
            });
        }
        // Each missing component, made by root with mode 0700, then walked again: what was
        // made is what is used.
        for dir in &walk.missing {
            let name = dir.file_name().expect("a component below an existing one");
            let c = CString::new(name.as_bytes()).expect("no NUL in a path component");
            // SAFETY: a valid dir fd and C string.
            let r =
                unsafe { libc::mkdirat(walk_dir_fd(&walk, dir)?.as_raw_fd(), c.as_ptr(), 0o700) };
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(IoError::new("create pin dir", dir, e).into());
                }
            }
        }
        let walk = self.walk()?;
        if !walk.missing.is_empty() {
            return Err(IoError::new(
                "create pin dir",
                &walk.missing[0],
                io::Error::from(io::ErrorKind::NotFound),
            )
            .into());
        }
        // 0700 even if root made it 0755 by hand: the maps are root's to read.
        let dir = File::open(&self.0).at("open", &self.0)?;
        dir.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .at("chmod 0700", &self.0)?;
        Ok(mounted)
    }

    /// Takes an exclusive lock on the pin dir for the daemon's lifetime.
    pub fn lock(&self) -> Result<File, PinError> {
        let dir = File::open(&self.0).at("open", &self.0)?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let pid = crate::state::DaemonRecord::load(&self.0)
                    .ok()
                    .flatten()
                    .filter(crate::state::DaemonRecord::running)
                    .map(|r| r.pid);
                return Err(PinError::Busy {
                    dir: self.0.clone(),
                    pid,
                });
            }
            return Err(IoError::new("lock", &self.0, e).into());
        }
        Ok(dir)
    }

    /// Recreates the pin dir after it was removed under a running daemon (root, 0700).
    pub fn recreate(&self) -> Result<(), PinError> {
        let walk = self.walk()?;
        if walk.missing.len() > 1 {
            // More than the pin dir itself is gone: not ours to rebuild.
            return Err(PinError::NotLoaded(self.0.clone()));
        }
        if let Some(dir) = walk.missing.first() {
            let c = CString::new(
                dir.file_name()
                    .expect("a component below an existing one")
                    .as_bytes(),
            )
            .expect("no NUL in a path component");
            // SAFETY: a valid dir fd and C string.
            if unsafe { libc::mkdirat(walk.fd.as_raw_fd(), c.as_ptr(), 0o700) } != 0 {
                return Err(IoError::new("create pin dir", dir, io::Error::last_os_error()).into());
            }
        }
        self.verify()
    }
}

/// The directory fd under which `dir` (one of `walk.missing`) is created: the walk's deepest
/// existing directory for the first, the one made just before it for the others.
fn walk_dir_fd(walk: &Walk, dir: &Path) -> Result<OwnedFd, PinError> {
    let parent = dir.parent().expect("a component has a parent");
    if parent == walk.at {
        return walk
            .fd
            .try_clone()
            .at("duplicate", &walk.at)
            .map_err(Into::into);
    }
    // Made by this process a moment ago, below a trusted directory.
    let rel = parent
        .strip_prefix(&walk.at)
        .expect("missing components lie below the walk's end");
    open_path(Some(&walk.fd), rel)
        .at("open", parent)
        .map_err(Into::into)
}

/// `openat(dir or AT_FDCWD, path, O_PATH | O_NOFOLLOW | O_CLOEXEC)`.
fn open_path(dir: Option<&OwnedFd>, path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: a valid dir fd (or AT_FDCWD) and C string; the fd returned is ours.
    let fd = unsafe {
        libc::openat(
            dirfd,
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed is a valid stat; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn is_bpffs(fd: &OwnedFd) -> io::Result<bool> {
    // SAFETY: zeroed is a valid statfs; fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd (O_PATH fds are accepted by fstatfs) and out pointer.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type == BPF_FS_MAGIC)
}

/// Whether the pin dir is (or would be) usable, and why, for `check`.
pub fn bpffs_state(pin: &PinDir) -> (bool, String) {
    let walk = match pin.walk() {
        Ok(w) => w,
        Err(e) => return (false, e.to_string()),
    };
    match is_bpffs(&walk.fd) {
        Ok(true) => match visible_to_host(&walk.fd, &walk.at) {
            Ok(()) => (true, format!("{} is on bpffs", walk.at.display())),
            Err(why) => (
                false,
                PinError::NotVisible {
                    path: pin.path().to_owned(),
                    why,
                }
                .to_string(),
            ),
        },
        Ok(false) if pin.path().starts_with(BPFFS_ROOT) => match host_mount_namespace() {
            Ok(()) => (
                true,
                format!("not mounted on {BPFFS_ROOT}; the daemon will mount it (mode 0700)"),
            ),
            Err(why) => (
                false,
                format!("nothing is mounted on {BPFFS_ROOT} and the daemon would not mount it here: {why}"),
            ),
        },
        Ok(false) => (
            false,
            format!(
                "{} is not on bpffs and is not under {BPFFS_ROOT}",
                pin.path().display()
            ),
        ),
        Err(e) => (false, format!("statfs {}: {e}", walk.at.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_pin_dir_is_refused_by_name() {
        let e = PinDir::new("pins").verify().unwrap_err();
        assert!(matches!(e, PinError::Relative(_)));
        assert!(
            e.to_string()
                .contains("pin dir pins must be an absolute path"),
            "{e}"
        );
    }

    #[test]
    fn dot_dot_components_are_refused() {
        assert!(matches!(
            PinDir::new("/sys/fs/bpf/../bpf/x").verify(),
            Err(PinError::NotDirectory { .. })
        ));
    }
}
