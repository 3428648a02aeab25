//! RAII directories: a test's own bpffs [`PinDir`] (unloaded and removed on drop) and a
//! scratch [`TempDir`].

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::{
    cmd::{find_bin, run_cmd_timeout},
    CMD_TIMEOUT, PREFIX,
};

/// A test's own pin dir `/sys/fs/bpf/<PREFIX>-<name>-<pid>` (not created here: the daemon
/// creates it). Drop runs `port-guard --pin-dir DIR unload` (failure ignored) and then removes
/// the dir if it is still there.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(name: &str) -> PinDir {
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/{PREFIX}-{name}-{}",
            std::process::id()
        ));
        let pd = PinDir { path };
        if pd.path.exists() {
            // Left over from an earlier run with the same pid.
            pd.cleanup();
        }
        pd
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a `&str` (for argument lists).
    pub fn as_str(&self) -> &str {
        self.path.to_str().expect("pin dir path is UTF-8")
    }

    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Path of the pin of map `name` (e.g. [`crate::common::MAP_LEASES`]).
    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn cleanup(&self) {
        if let Ok(bin) = find_bin() {
            let mut cmd = Command::new(bin);
            cmd.arg("--pin-dir").arg(&self.path).arg("unload");
            match run_cmd_timeout(cmd, CMD_TIMEOUT) {
                Ok((code, _, err)) if code != 0 && self.path.exists() => {
                    eprintln!(
                        "[harness] unload of {} exited {code}: {err}",
                        self.path.display()
                    )
                }
                Err(e) => eprintln!("[harness] unload of {}: {e}", self.path.display()),
                _ => {}
            }
        }
        // The daemon's record of itself stays after unload (it describes the last daemon);
        // remove the state of this pin dir and of the pin dirs below it (the bench nests them).
        remove_state_files(&self.path);
        if self.path.exists() {
            // Pins are files (unlink) and maybe sub dirs; bpffs allows both.
            if let Err(e) = fs::remove_dir_all(&self.path) {
                eprintln!("[harness] remove {}: {e}", self.path.display());
            }
        }
    }
}

/// The agent's state file `what` of pin dir `pin` under /run/port-guard (its naming).
pub fn state_file(pin: &Path, what: &str) -> PathBuf {
    let name: String = pin
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
    Path::new("/run/port-guard").join(format!("{name}.{what}"))
}

/// Removes the agent's state files of pin dir `pin` and of every pin dir below it.
pub fn remove_state_files(pin: &Path) {
    let own = state_file(pin, "");
    let own = own.file_name().unwrap().to_string_lossy().into_owned();
    let below = own.trim_end_matches('.').to_owned() + "_";
    for e in fs::read_dir("/run/port-guard")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&own) || name.starts_with(&below) {
            let _ = fs::remove_file(e.path());
        }
    }
}

impl AsRef<Path> for PinDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        self.cleanup();
    }
}

static TEMP_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory `$TMPDIR/<PREFIX>-<name>-<pid>-<n>` (mode 0755, so `nobody` can read
/// config files in it), removed recursively on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{PREFIX}-{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o755));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `file` (relative) with `contents` (mode 0644) and returns its path.
    pub fn write(&self, file: &str, contents: &str) -> PathBuf {
        let p = self.path.join(file);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o644));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
