//! `port-guard reload`: SIGHUP to the running daemon, then its answer from its record.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{pin::PinDir, state::DaemonRecord};

/// Tells the running daemon to reload, and waits for its answer in its record.
pub fn run(pin: &PinDir, timeout: u64) -> Result<()> {
    let dir = pin.path();
    let record = running_daemon(dir)?;
    signal(&record)?;
    answer(dir, &record, timeout)
}

/// The record of the daemon of `dir`, which must be running.
fn running_daemon(dir: &Path) -> Result<DaemonRecord> {
    let Some(record) = DaemonRecord::load(dir)? else {
        bail!(
            "no daemon ran on {} since boot: nothing to reload",
            dir.display()
        );
    };
    if !record.running() {
        bail!(
            "the daemon of {} (pid {}) is not running: nothing to reload (start it)",
            dir.display(),
            record.pid
        );
    }
    Ok(record)
}

/// Waits until the daemon counts a reload past the one `record` (read before the signal) counts,
/// and says how it went.
fn answer(dir: &Path, record: &DaemonRecord, timeout: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = DaemonRecord::load(dir)?.context("the daemon's record disappeared")?;
        if now.pid != record.pid || !now.running() {
            bail!(
                "the daemon (pid {}) ended before it answered the reload",
                record.pid
            );
        }
        if now.reloads > record.reloads {
            return match now.last_reload {
                Some(r) if r.ok => {
                    println!("config reloaded (daemon pid {})", record.pid);
                    Ok(())
                }
                Some(r) => bail!(
                    "the new config was refused, the previous one stays in force: {}",
                    r.error.unwrap_or_default()
                ),
                None => bail!("the daemon counted a reload but recorded no result"),
            };
        }
        if Instant::now() >= deadline {
            bail!(
                "the daemon (pid {}) did not answer the reload within {timeout} s",
                record.pid
            );
        }
    }
}

/// SIGHUP through a pidfd opened while the pid still names the recorded daemon, so that a pid
/// reused since can never get the signal.
fn signal(record: &DaemonRecord) -> Result<()> {
    let pid = record.pid;
    // SAFETY: pidfd_open(2) with a pid and no flags; the fd is owned from here on.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening the daemon's process (pid {pid})"));
    }
    // SAFETY: a fresh fd from pidfd_open.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if !record.running() {
        bail!("the daemon (pid {pid}) ended before it could be told to reload");
    }
    // SAFETY: pidfd_send_signal(2) on our pidfd, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGHUP,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sending SIGHUP to the daemon (pid {pid})"));
    }
    Ok(())
}
