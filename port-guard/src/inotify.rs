//! A non-blocking inotify instance: the daemon's way of hearing about cgroups at once.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// One inotify event.
#[derive(Debug)]
pub struct Event {
    pub wd: i32,
    pub mask: u32,
    /// The entry's name, for events on a watched directory.
    pub name: Option<std::ffi::OsString>,
}

pub struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    pub fn new() -> io::Result<Inotify> {
        // SAFETY: inotify_init1 returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        Ok(Inotify {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Adds (or updates) a watch; the watch descriptor, or None when `path` cannot be watched.
    pub fn add(&self, path: &Path, mask: u32) -> Option<i32> {
        let c = CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: valid fd and C string.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        (wd >= 0).then_some(wd)
    }

    pub fn remove(&self, wd: i32) {
        // SAFETY: valid fd; a stale wd only returns EINVAL.
        unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
    }

    /// Reads the pending events: (watch descriptor, mask, name) each. A queue overflow comes as
    /// one event with wd -1 and IN_Q_OVERFLOW: whoever reads must then look at everything.
    pub fn read_events(&self) -> Vec<Event> {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: reading into a local buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            let mut off = 0usize;
            let n = n as usize;
            let head = size_of::<libc::inotify_event>();
            while off + head <= n {
                // SAFETY: the kernel wrote a whole inotify_event header at `off`.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let name_end = (off + head + ev.len as usize).min(n);
                let raw = &buf[off + head..name_end];
                let name = raw.split(|&b| b == 0).next().filter(|s| !s.is_empty());
                out.push(Event {
                    wd: ev.wd,
                    mask: ev.mask,
                    name: name.map(|s| std::ffi::OsStr::from_bytes(s).to_owned()),
                });
                off = name_end;
            }
        }
    }

    /// Reads and discards pending events; returns whether there were any. (The daemon rescans
    /// on any event, so what the events say does not matter.)
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: reading into a local buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return any;
            }
            any = true;
        }
    }

    /// Watches the nearest existing directory above each of `dirs` for IN_CREATE/IN_DELETE:
    /// tells the daemon at once when an allowed cgroup, or an ancestor of one, is created or
    /// removed. Adding a watch twice is a no-op.
    pub fn watch_parents(&self, dirs: impl IntoIterator<Item = std::path::PathBuf>) {
        for dir in dirs {
            let mut d = dir.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            while !d.is_dir() {
                if !d.pop() {
                    break;
                }
            }
            self.add(&d, libc::IN_CREATE | libc::IN_DELETE | libc::IN_ONLYDIR);
        }
    }
}
