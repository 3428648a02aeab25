//! The bench's own corner of the machine: a network namespace, a cgroup subtree
//! (`/pg-bench-PID`), a pin dir (`/sys/fs/bpf/pg-bench-PID`), the daemons and the worker
//! processes. Everything is torn down in `Drop`, also when a phase fails or panics, and a
//! SIGINT/SIGTERM only sets a flag that the phases check between batches, so that the unwinding
//! does the cleanup. What a killed bench (SIGKILL) left behind is removed by the next run
//! ([`remove_stale`]).

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use port_guard::{
    guard,
    pin::{PinDir, PinError},
};

mod procs;

pub use procs::{Daemon, Worker};

/// Name prefix of every cgroup and pin dir the bench makes.
pub const PREFIX: &str = "pg-bench";
/// bpffs root the pin dirs live under.
const BPFFS: &str = "/sys/fs/bpf";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set a flag instead of killing the bench half way.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Fails once a signal asked the bench to stop: the caller returns and `Drop` cleans up.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted by a signal; cleaning up");
    }
    Ok(())
}

/// Sleeps, waking early when interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

/// Moves this process into a network namespace of its own, with `lo` up. Every child inherits it:
/// the bench binds any port it likes (the 20,000-port allocation range included) without touching
/// the host's ports or sysctls, and the namespace goes away with the last process in it.
/// Must run before any thread is started (unshare affects the calling thread).
pub fn enter_netns() -> Result<()> {
    // SAFETY: plain syscalls; the ifreq is zeroed and its name NUL-terminated.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("socket for SIOCSIFFLAGS");
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let r = if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr)
        } else {
            -1
        };
        let err = io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(err).context("bringing lo up in the bench's network namespace");
        }
    }
    Ok(())
}

/// A cgroup of the bench's subtree.
#[derive(Clone, Debug)]
pub struct Cg {
    /// Directory on the cgroup2 mount.
    pub abs: PathBuf,
    /// Path relative to the mount, as port-guard takes it.
    pub rel: String,
    /// Inode number of the directory: what the programs see.
    pub id: u64,
    /// Level below the root (the root is 0).
    pub level: u32,
}

/// The bench's cgroup subtree `/pg-bench-PID`, removed with everything in it on drop.
pub struct Tree {
    pub root: Cg,
}

impl Tree {
    pub fn new() -> Result<Tree> {
        let mount = port_guard::cgroup::Cgroup2::find()?.mount().to_owned();
        let name = format!("{PREFIX}-{}", std::process::id());
        let abs = mount.join(&name);
        fs::create_dir(&abs).with_context(|| format!("creating cgroup {}", abs.display()))?;
        let id = fs::metadata(&abs)?.ino();
        Ok(Tree {
            root: Cg {
                abs,
                rel: format!("/{name}"),
                id,
                level: 1,
            },
        })
    }

    /// Creates `sub` (relative to the subtree root, parents included) and returns it.
    pub fn mkdir(&self, sub: &str) -> Result<Cg> {
        let abs = self.root.abs.join(sub);
        fs::create_dir_all(&abs).with_context(|| format!("creating cgroup {}", abs.display()))?;
        let id = fs::metadata(&abs)?.ino();
        let rel = format!("{}/{sub}", self.root.rel);
        let level = rel.split('/').filter(|c| !c.is_empty()).count() as u32;
        Ok(Cg {
            abs,
            rel,
            id,
            level,
        })
    }
}

impl Tree {
    /// Removes `cg` (below the subtree) with everything in and below it, as the drop does for the
    /// whole subtree: for a phase that makes thousands of cgroups and wants them gone before the
    /// next measurement.
    pub fn remove(&self, cg: &Cg) -> Result<()> {
        if !cg.abs.starts_with(&self.root.abs) || cg.abs == self.root.abs {
            bail!("{} is not below the bench's subtree", cg.abs.display());
        }
        kill_and_remove(&cg.abs)
    }
}

/// Gives `cg` to `uid` the way systemd delegates a subtree to a user (`Delegate=yes`): its
/// directory and its `cgroup.procs`, `cgroup.subtree_control` and `cgroup.threads`. The user may
/// then make cgroups below it and move its own processes between them.
pub fn delegate(cg: &Cg, uid: u32) -> Result<()> {
    for f in [
        "",
        "cgroup.procs",
        "cgroup.subtree_control",
        "cgroup.threads",
    ] {
        let p = if f.is_empty() {
            cg.abs.clone()
        } else {
            cg.abs.join(f)
        };
        std::os::unix::fs::chown(&p, Some(uid), Some(uid))
            .with_context(|| format!("chown {uid} {}", p.display()))?;
    }
    Ok(())
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Err(e) = kill_and_remove(&self.root.abs) {
            eprintln!("bench: removing cgroup {}: {e:#}", self.root.abs.display());
        }
    }
}

/// Kills every process below `dir` (cgroup.kill, 5.14+; SIGKILL by pid before that) and removes
/// the cgroups, deepest first.
fn kill_and_remove(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let populated = || {
        fs::read_to_string(dir.join("cgroup.events"))
            .map(|t| t.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while populated() && Instant::now() < deadline {
        if fs::write(dir.join("cgroup.kill"), "1").is_err() {
            for d in subdirs(dir) {
                for pid in fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill has no memory preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut dirs = subdirs(dir);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let mut tries = 0;
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if tries < 100 => {
                    let _ = e;
                    tries += 1;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).with_context(|| format!("rmdir {}", d.display())),
            }
        }
    }
    Ok(())
}

/// `dir` and every directory below it.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// The pin dirs of the bench's guards, `/sys/fs/bpf/pg-bench-PID/<name>`; each is unloaded
/// (links detached, pins removed) on drop.
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    pub fn new() -> Pins {
        Pins {
            dir: Path::new(BPFFS).join(format!("{PREFIX}-{}", std::process::id())),
        }
    }

    /// The pin dir for one guard. The daemon creates it (and mounts bpffs when it is missing).
    pub fn dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        unload_all(&self.dir);
    }
}

fn unload_all(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            match guard::unload(&PinDir::new(e.path())) {
                Ok(()) | Err(guard::GuardError::PinDir(PinError::NotLoaded(_))) => {}
                Err(err) => eprintln!("bench: unloading {}: {err}", e.path().display()),
            }
        }
    }
    let _ = fs::remove_dir(dir);
    // The daemons' records of the pin dirs below `dir` (/run/port-guard/<dir, mangled>_*).
    let own = port_guard::state::path(dir, "");
    if let (Some(parent), Some(name)) = (own.parent(), own.file_name()) {
        let below = name.to_string_lossy().trim_end_matches('.').to_owned() + "_";
        for e in fs::read_dir(parent).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&below) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Removes what a bench killed before its cleanup left: `pg-bench-PID` cgroups, pin dirs and
/// temp dirs whose process is gone. Returns what it removed.
pub fn remove_stale(mount: &Path) -> Vec<String> {
    let alive = |pid: &str| {
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().starts_with("port-guard-ben"))
            .unwrap_or(false)
    };
    let mut removed = Vec::new();
    for (root, kind) in [
        (PathBuf::from(BPFFS), 0),
        (mount.to_owned(), 1),
        (std::env::temp_dir(), 2),
    ] {
        let Ok(entries) = fs::read_dir(&root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(&format!("{PREFIX}-")) else {
                continue;
            };
            if pid.parse::<u32>().is_err() || alive(pid) {
                continue;
            }
            match kind {
                0 => unload_all(&e.path()),
                1 => {
                    if let Err(err) = kill_and_remove(&e.path()) {
                        eprintln!(
                            "bench: removing stale cgroup {}: {err:#}",
                            e.path().display()
                        );
                        continue;
                    }
                }
                _ => {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
            removed.push(e.path().display().to_string());
        }
    }
    removed
}

/// Makes `cmd` move itself into `cg` before exec, in a process group of its own (a terminal's
/// Ctrl-C reaches the bench only, which then cleans up in order), and die with the bench.
pub fn in_cgroup(cmd: &mut Command, cg: &Cg, death_signal: libc::c_int) {
    let procs = CString::new(cg.abs.join("cgroup.procs").as_os_str().as_bytes())
        .expect("no NUL in a cgroup path");
    cmd.process_group(0);
    // SAFETY: only async-signal-safe calls between fork and exec; `procs` is prepared before.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            libc::close(fd);
            libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong);
            Ok(())
        });
    }
}

/// A scratch directory (config files), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("{PREFIX}-{}", std::process::id()));
        fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
