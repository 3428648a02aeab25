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

/// Reads a state file: None when there is none. Refused when it is a link, not a plain file, or
/// not root's alone (the directory is root's 0700, so this only catches damage).
pub fn read(path: &Path) -> Result<Option<String>, IoError> {
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IoError::new("open", path, e)),
    };
    let m = file.metadata().at("stat", path)?;
    if !m.is_file() || m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(IoError::new(
            "trust",
            path,
            io::Error::other(format!(
                "owned by uid {} with mode {:04o}, or not a plain file: only root's is trusted",
                m.uid(),
                m.mode() & 0o7777
            )),
        ));
    }
    io::read_to_string(file).at("read", path).map(Some)
}

/// Removes a state file; one that is not there is fine.
pub fn remove(path: &Path) -> Result<(), IoError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(IoError::new("remove", path, e)),
    }
}

/// When process `pid` started (clock ticks since boot, /proc/PID/stat field 22): with the pid,
/// it names one process for as long as the machine runs. None when no such process exists.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    // A zombie (or a dying process) has ended, whatever its parent has not collected yet.
    if matches!(fields.next()?, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// What a daemon records about itself for `status`, `reload` and the next daemon:
/// `<pin dir>.daemon`, JSON. It stays after the daemon ends (with `stopped`, or with a pid that
/// no longer names it), so that `status` can tell "stopped" from "never ran".
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DaemonRecord {
    pub pid: u32,
    /// [`process_start`] of `pid`: the record describes a running daemon only while it matches.
    pub starttime: u64,
    /// Unix seconds.
    pub started: u64,
    /// The config file in force (None: no file, defaults and flags).
    pub config: Option<PathBuf>,
    /// Flags given on the command line that override keys of the file.
    pub overrides: Vec<String>,
    /// The policy flags given on the command line: a reload merges the file with them.
    #[serde(default)]
    pub flags: crate::config::Overrides,
    /// The ranges as configured, each with its allowed cgroups whether they exist or not.
    pub ranges: Vec<ConfiguredRange>,
    /// The configured network namespaces (`host`, `all`, paths).
    #[serde(default)]
    pub netns: String,
    /// Reloads tried (SIGHUP), whatever their result: `reload` waits for this to move.
    pub reloads: u64,
    pub last_reload: Option<ReloadRecord>,
    /// Unix seconds at which the daemon exited cleanly.
    pub stopped: Option<u64>,
    /// A digest of the policy and metrics settings in force (of the file and the flags): what
    /// `status` compares with the file on disk to tell when they differ.
    #[serde(default)]
    pub config_digest: Option<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ConfiguredRange {
    pub ports: String,
    pub first: u16,
    pub last: u16,
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReloadRecord {
    /// Unix seconds.
    pub at: u64,
    pub ok: bool,
    /// Why the new config was refused.
    pub error: Option<String>,
}

impl DaemonRecord {
    pub fn path(pin_dir: &Path) -> PathBuf {
        path(pin_dir, "daemon")
    }

    /// The record of `pin_dir`'s daemon, if one ever ran since boot.
    pub fn load(pin_dir: &Path) -> Result<Option<DaemonRecord>, IoError> {
        let path = Self::path(pin_dir);
        let Some(text) = read(&path)? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| IoError::new("parse", &path, io::Error::other(e)))
    }

    pub fn save(&self, pin_dir: &Path) -> Result<(), IoError> {
        let text = serde_json::to_string_pretty(self).expect("a record serialises");
        write(&Self::path(pin_dir), &(text + "\n"), 0o644)
    }

    /// Whether the daemon this record describes runs now: its pid names the same process.
    pub fn running(&self) -> bool {
        self.stopped.is_none() && process_start(self.pid) == Some(self.starttime)
    }
}

/// When each range's counters started (`<pin dir>.counters`, lines `FIRST-LAST UNIX_SECS`):
/// counters live in the pinned maps and restart when a range's slot goes to other ports.
pub fn counters_since(pin_dir: &Path) -> std::collections::BTreeMap<(u16, u16), u64> {
    let text = read(&path(pin_dir, "counters"))
        .ok()
        .flatten()
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (range, since) = l.split_once(' ')?;
            let (a, b) = range.split_once('-')?;
            Some(((a.parse().ok()?, b.parse().ok()?), since.parse().ok()?))
        })
        .collect()
}

/// Records when each range's counters started: `fresh` ranges now, the others as recorded.
pub fn record_counters(
    pin_dir: &Path,
    ranges: &[(u16, u16)],
    fresh: &[(u16, u16)],
    now: u64,
) -> Result<(), IoError> {
    let old = counters_since(pin_dir);
    let mut text = String::new();
    for r in ranges {
        let since = if fresh.contains(r) {
            Some(now)
        } else {
            old.get(r).copied()
        };
        if let Some(since) = since {
            text += &format!("{}-{} {since}\n", r.0, r.1);
        }
    }
    write(&path(pin_dir, "counters"), &text, 0o644)
}

/// What the daemon counts itself, as it last wrote it (`<pin dir>.stats`): what
/// `status --prometheus` shows of the daemon while none runs.
pub fn load_stats(pin_dir: &Path) -> Option<crate::metrics::DaemonStats> {
    let text = read(&path(pin_dir, "stats")).ok()??;
    serde_json::from_str(&text).ok()
}

pub fn save_stats(pin_dir: &Path, stats: &crate::metrics::DaemonStats) -> Result<(), IoError> {
    let text = serde_json::to_string(stats).expect("stats serialise");
    write(&path(pin_dir, "stats"), &(text + "\n"), 0o644)
}

/// The records of a daemon that go with the guard when it is unloaded: its record and counts.
pub fn remove_daemon_files(pin_dir: &Path) {
    for what in ["daemon", "stats"] {
        let _ = remove(&path(pin_dir, what));
    }
}

/// A short, stable digest of `text` (FNV-1a, 64 bits, in hex): enough to tell a changed config.
pub fn digest(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
