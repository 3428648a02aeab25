//! Network namespaces as the agent handles them: opened by path (an nsfs file), named for logs,
//! and entered by one thread at a time to do something there (probe a port, write a sysctl, list
//! sockets) while the rest of the process stays where it is.

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use crate::error::IoError;

/// `ioctl(NS_GET_NSTYPE)`: `_IO(0xb7, 0x3)` (linux/nsfs.h).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// Where `ip netns` keeps named namespaces.
pub const RUN_NETNS: &str = "/run/netns";

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    /// Its inode number on nsfs: what `ip netns identify` and /proc/PID/ns/net show.
    pub inode: u64,
    fd: OwnedFd,
}

impl Netns {
    /// The netns of the calling thread.
    pub fn own() -> Result<Netns, IoError> {
        let p = Path::new("/proc/thread-self/ns/net");
        Netns::open(p)?
            .ok_or_else(|| IoError::new("open", p, io::Error::from(io::ErrorKind::NotFound)))
    }

    /// Opens the netns file at `path`; Ok(None) only when there is none (ENOENT), an error
    /// when the file is not a network namespace. Paths under /proc are magic links to the
    /// namespace and are followed; any other path must not be a symbolic link.
    pub fn open(path: &Path) -> Result<Option<Netns>, IoError> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| {
            IoError::new("open", path, io::Error::new(io::ErrorKind::InvalidInput, e))
        })?;
        let mut flags = libc::O_RDONLY | libc::O_CLOEXEC;
        if !path.starts_with("/proc") {
            flags |= libc::O_NOFOLLOW;
        }
        // SAFETY: a valid C string; the fd returned is ours.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::NotFound => Ok(None),
                _ => Err(IoError::new("open netns", path, e)),
            };
        }
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an ioctl without argument on an fd we own.
        let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(IoError::new(
                "open netns",
                path,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a network namespace (nsfs) file",
                ),
            ));
        }
        let inode = File::from(fd.try_clone().map_err(|e| IoError::new("dup", path, e))?)
            .metadata()
            .map_err(|e| IoError::new("stat", path, e))?
            .ino();
        Ok(Some(Netns { inode, fd }))
    }

    /// Runs `f` on a thread of its own that has entered this netns, and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let fd = self.fd.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on a valid nsfs fd; it moves this thread only.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("a thread in another netns panicked"))?
        })
    }

    /// The raw fd, for setns(2) after fork.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// The `ip netns` name of the netns with inode `inode`, if it has one.
pub fn run_netns_name(inode: u64) -> Option<String> {
    fs::read_dir(RUN_NETNS)
        .ok()?
        .flatten()
        .find(|e| fs::metadata(e.path()).is_ok_and(|m| m.ino() == inode))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// The netns with inode `inode`, reached through its `ip netns` file or any process in it
/// (/proc/PID/ns/net, the opened file's inode checked): None when neither reaches it.
pub fn find(inode: u64) -> Option<(PathBuf, Netns)> {
    let named = run_netns_name(inode).map(|n| Path::new(RUN_NETNS).join(n));
    let procs = fs::read_dir("/proc").ok()?.flatten().filter_map(|e| {
        let pid = e.file_name();
        let pid = pid.to_str()?;
        pid.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| PathBuf::from(format!("/proc/{pid}/ns/net")))
    });
    named
        .into_iter()
        .chain(procs)
        .filter(|p| fs::metadata(p).is_ok_and(|m| m.ino() == inode))
        .find_map(|p| match Netns::open(&p) {
            Ok(Some(ns)) if ns.inode == inode => Some((p, ns)),
            _ => None,
        })
}

/// A path that opens the netns with inode `inode` for as long as it lives: its `ip netns`
/// file, or this process's own /proc entry (valid while the process runs).
pub fn path_of(inode: u64) -> PathBuf {
    match run_netns_name(inode) {
        Some(name) => Path::new(RUN_NETNS).join(name),
        None => PathBuf::from(format!("/proc/{}/ns/net", std::process::id())),
    }
}

/// Where an allocation's probe bind must find a port free: the guarded namespaces, as the
/// daemon recorded them for the pin dir (the caller's own, when it is one of them, without
/// leaving it).
pub struct ProbeIn {
    here: bool,
    others: Vec<(PathBuf, Netns)>,
}

impl ProbeIn {
    /// The caller's netns only.
    pub fn here() -> ProbeIn {
        ProbeIn {
            here: true,
            others: Vec::new(),
        }
    }

    /// From the daemon's record of `pin_dir`'s guarded namespaces; the caller's netns only when
    /// there is none (no daemon has run) or the guard enforces in every netns.
    pub fn guarded(pin_dir: &Path) -> Result<ProbeIn, IoError> {
        let record = crate::state::path(pin_dir, "netns");
        let text = match fs::read_to_string(&record) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ProbeIn::here()),
            Err(e) => return Err(IoError::new("read", record, e)),
        };
        if text.lines().next() == Some("all") {
            return Ok(ProbeIn::here());
        }
        let own = Netns::own()?.inode;
        let mut p = ProbeIn {
            here: false,
            others: Vec::new(),
        };
        for line in text.lines() {
            let mut it = line.splitn(3, ' ');
            let (Some(inode), Some(path)) =
                (it.next().and_then(|i| i.parse::<u64>().ok()), it.next())
            else {
                continue;
            };
            if inode == own {
                p.here = true;
                continue;
            }
            let path = PathBuf::from(path);
            match Netns::open(&path)? {
                Some(ns) if ns.inode == inode => p.others.push((path, ns)),
                // Gone (or the path names another netns now): nothing to probe there.
                _ => {}
            }
        }
        Ok(p)
    }

    /// Runs `probe` where the port must be free; false as soon as one says it is not.
    pub fn all_free<E: Send>(
        &self,
        probe: impl Fn() -> Result<bool, E> + Sync,
    ) -> Result<bool, ProbeError<E>> {
        if self.here && !probe().map_err(ProbeError::Probe)? {
            return Ok(false);
        }
        for (path, ns) in &self.others {
            let free = ns
                .run(&probe)
                .map_err(|e| ProbeError::Enter(IoError::new("enter netns", path, e)))?
                .map_err(ProbeError::Probe)?;
            if !free {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A probe in [`ProbeIn`] failed.
#[derive(Debug)]
pub enum ProbeError<E> {
    /// The probe itself.
    Probe(E),
    /// Entering a guarded netns.
    Enter(IoError),
}
