//! The exposition as a file, for node_exporter's textfile collector (`--collector.textfile.directory`):
//! the metrics reach Prometheus with no port of the daemon's open at all.
//!
//! The file is replaced whole (a temporary file in the same directory, renamed over it), so the
//! collector never reads half of it. The directory is opened once, without following a link,
//! and everything happens relative to it: the temporary file is created with `O_EXCL` and
//! `O_NOFOLLOW` under a fresh name, so nothing planted in the directory is written through. The
//! file is mode 0644: metrics are for the collector to read.

use std::{
    ffi::CString,
    io::{self, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// Where the file goes: an absolute path ending in `.prom` (what the collector reads).
pub fn check_path(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!(
            "metrics textfile {} must be an absolute path, e.g. /var/lib/prometheus/node-exporter/port-guard.prom",
            path.display()
        ));
    }
    if path.extension().is_none_or(|e| e != "prom") {
        return Err(format!(
            "metrics textfile {} must end in .prom (node_exporter's textfile collector reads only those)",
            path.display()
        ));
    }
    Ok(())
}

/// Writes `text` to `path`, replacing it whole.
pub fn write(path: &Path, text: &str) -> io::Result<()> {
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (d, n),
        _ => {
            return Err(io::Error::other(format!(
                "{} names no file",
                path.display()
            )))
        }
    };
    let dir_fd = open_dir(dir)?;
    let tmp_name = format!(
        ".{}.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        nonce()
    );
    let tmp = CString::new(tmp_name.as_bytes()).map_err(io::Error::other)?;
    let final_name = CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid dir fd and C string.
    let fd = unsafe {
        libc::openat(
            dir_fd.as_raw_fd(),
            tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644)));
    drop(file);
    // SAFETY: valid dir fd and C strings.
    let renamed = written.and_then(|()| {
        let r = unsafe {
            libc::renameat(
                dir_fd.as_raw_fd(),
                tmp.as_ptr(),
                dir_fd.as_raw_fd(),
                final_name.as_ptr(),
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    });
    if renamed.is_err() {
        // SAFETY: as above.
        unsafe { libc::unlinkat(dir_fd.as_raw_fd(), tmp.as_ptr(), 0) };
    }
    renamed
}

/// The directory, opened without following a link at its last component.
fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid C string.
    let fd = unsafe {
        libc::open(
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

/// A number that differs between two writes of one process.
fn nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_replaced_whole_and_a_planted_link_is_not_followed() {
        let dir = std::env::temp_dir().join(format!("pg-textfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("port-guard.prom");
        write(&path, "a 1\n").unwrap();
        write(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        // A link planted at the final name is replaced, not written through.
        let victim = dir.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write(&path, "a 3\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        // Only the final file and the victim: no temporary file left.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(check_path(Path::new("rel.prom")).is_err());
        assert!(check_path(Path::new("/x/a.txt")).is_err());
        assert!(check_path(Path::new("/x/a.prom")).is_ok());
    }
}
