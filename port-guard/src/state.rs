//! The agent's own files under /run/port-guard (a tmpfs: they outlive a daemon, not a reboot,
//! like the kernel state they describe): what ephemeral protection added to each netns's sysctl,
//! and which namespaces a daemon guards. The directory is root's alone; files are written whole
//! (a new file renamed over the old) and never through a link.

use std::{
    fs, io,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use crate::error::{IoContext as _, IoError};

/// Where the files live.
pub const STATE_DIR: &str = "/run/port-guard";

/// A state file of a pin dir: `<pin dir, as a name>.<what>`.
pub fn path(pin_dir: &Path, what: &str) -> PathBuf {
    let name: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Path::new(STATE_DIR).join(format!("{name}.{what}"))
}

/// Makes sure the directory exists, root's, writable by nobody else, not a link.
pub fn dir() -> Result<(), IoError> {
    let dir = Path::new(STATE_DIR);
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(IoError::new("create", dir, e)),
    }
    let m = fs::symlink_metadata(dir).at("stat", dir)?;
    if !m.is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(IoError::new(
            "use",
            dir,
            io::Error::other(format!(
                "owned by uid {} with mode {:04o}, or not a directory: only root's is trusted",
                m.uid(),
                m.mode() & 0o7777
            )),
        ));
    }
    Ok(())
}

/// Writes `text` to `path` whole: a new file (mode `mode`, never through a link) renamed over it.
pub fn write(path: &Path, text: &str, mode: u32) -> Result<(), IoError> {
    dir()?;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .at("create", &tmp)?;
    f.write_all(text.as_bytes()).at("write", &tmp)?;
    fs::rename(&tmp, path).at("rename to", path)
}
