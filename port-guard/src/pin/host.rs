//! Is a bpffs the host's? A pin on a bpffs that only a private mount namespace sees dies with that
//! namespace, so the daemon pins only where the host's initial mount namespace sees the very
//! same directory, and mounts bpffs itself only in that namespace. No evidence is not evidence:
//! when the answer cannot be told, the answer is no, with the reason.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::OwnedFd,
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::Path,
};

use log::info;

use super::{fstat, PinError};
use crate::error::IoError;

/// nsfs inode numbers of the initial namespaces (include/uapi/linux/nsfs.h). The PID one is
/// fixed since 3.8; the mount one since 6.18, and no dynamically allocated namespace can have it
/// (those start at 0xF0000000), so seeing it is proof on any kernel.
const PID_NS_INIT_INO: u64 = 0xEFFF_FFFC;
const MNT_NS_INIT_INO: u64 = 0xEFFF_FFF8;

fn ns_inode(kind: &str) -> io::Result<u64> {
    fs::metadata(format!("/proc/self/ns/{kind}")).map(|m| m.ino())
}

/// Ok when this process is in the host's initial mount namespace, else why not (or why it cannot
/// tell: no evidence is not evidence).
pub(super) fn host_mount_namespace() -> Result<(), String> {
    let own = ns_inode("mnt").map_err(|e| format!("cannot read /proc/self/ns/mnt: {e}"))?;
    if own == MNT_NS_INIT_INO {
        return Ok(());
    }
    let pid_ns = ns_inode("pid").map_err(|e| format!("cannot read /proc/self/ns/pid: {e}"))?;
    if pid_ns != PID_NS_INIT_INO {
        return Err("this process is not in the host's PID namespace (a container?), so it cannot compare mount namespaces with the host's init".into());
    }
    match fs::metadata("/proc/1/ns/mnt") {
        Ok(m) if m.ino() == own => Ok(()),
        Ok(_) => Err("this process runs in a mount namespace of its own".into()),
        Err(e) => Err(format!(
            "cannot read /proc/1/ns/mnt to compare mount namespaces with the host's init: {e}"
        )),
    }
}

/// Ok when the directory `fd` (at `path`) is the same directory in the host's initial mount
/// namespace, else why not.
pub(super) fn visible_to_host(fd: &OwnedFd, path: &Path) -> Result<(), String> {
    let why = match host_mount_namespace() {
        Ok(()) => return Ok(()),
        Err(why) => why,
    };
    // In a mount namespace of its own (a systemd unit with mount sandboxing): the host's view of
    // the same path, through init's root, must be this very directory.
    let ours = fstat(fd).map_err(|e| format!("stat {}: {e}", path.display()))?;
    let host = Path::new("/proc/1/root").join(path.strip_prefix("/").unwrap_or(path));
    match fs::metadata(&host) {
        Ok(m) if m.dev() == ours.st_dev && m.ino() == ours.st_ino => Ok(()),
        Ok(_) => Err(format!(
            "{why}, and {} is another directory in the host's mount namespace",
            path.display()
        )),
        Err(e) => Err(format!("{why}, and {} cannot be read: {e}", host.display())),
    }
}

pub(super) fn mount_bpffs(at: &Path) -> Result<(), PinError> {
    let c = CString::new(at.as_os_str().as_bytes()).expect("no NUL in path");
    // SAFETY: valid C strings; the data is a mount option string.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(IoError::new("mount bpffs on", at, io::Error::last_os_error()).into());
    }
    info!(
        "mounted bpffs on {} with mode 0700 (nothing was mounted there)",
        at.display()
    );
    Ok(())
}
