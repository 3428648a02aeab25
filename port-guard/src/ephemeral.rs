//! Keeping the kernel from auto-picking reserved ports.
//!
//! The bind hook never sees ports the kernel chooses itself (connect() without bind(), UDP
//! sendto(), bind() to port 0, listen() on an unbound socket, TCP fastopen, a narrowed
//! IP_LOCAL_PORT_RANGE). net.ipv4.ip_local_reserved_ports, per network namespace and covering
//! IPv6 and UDP too, keeps all of those choices out of the reserved ranges.
//!
//! The ranges are merged into whatever the sysctl holds, and the ports this adds (those it did
//! not hold already) are recorded in a file under /run/port-guard that outlives a daemon crash
//! (like the sysctl, not a reboot). `unload` removes exactly those ports and keeps whatever
//! others added meanwhile. The daemon looks at the sysctl every few seconds ([`repair`]: inotify
//! does not work on /proc/sys) and puts back reserved ports something else removed.

use std::{
    fs, io,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use crate::{
    error::{IoContext as _, IoError},
    policy::PortRange,
    state,
};

const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// An ephemeral-port protection problem (runtime, exit 1).
#[derive(Debug, thiserror::Error)]
pub enum EphemeralError {
    /// Reading or writing the sysctl or the saved state failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The protection was applied in another network namespace.
    #[error("net.ipv4.ip_local_reserved_ports was changed in network namespace net:[{saved}], which no path or process reaches from here (this process is in net:[{current}]): run `port-guard unload` inside it, or, if it is gone, `port-guard unload --forget-unreachable`")]
    OtherNetns { saved: u64, current: u64 },
    /// The saved state file is not ours or is damaged.
    #[error(
        "cannot understand {0}; restore net.ipv4.ip_local_reserved_ports by hand and remove it"
    )]
    BadState(PathBuf),
    /// The state dir or file is not root's alone.
    #[error("{path} is owned by uid {uid} with mode {mode:04o}, or is not a plain file or directory; only root's are trusted (inspect it, then remove it)")]
    Untrusted { path: PathBuf, uid: u32, mode: u32 },
}

/// A set of ports, one bit each.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet(Vec<u64>);

impl PortSet {
    pub fn new() -> PortSet {
        PortSet(vec![0; 1024])
    }

    pub fn from_ranges(ranges: &[PortRange]) -> PortSet {
        let mut s = PortSet::new();
        for r in ranges {
            for p in r.ports() {
                s.0[usize::from(p) / 64] |= 1 << (p % 64);
            }
        }
        s
    }

    fn contains(&self, p: u16) -> bool {
        self.0[usize::from(p) / 64] & (1 << (p % 64)) != 0
    }

    pub fn union(&self, o: &PortSet) -> PortSet {
        PortSet(self.0.iter().zip(&o.0).map(|(a, b)| a | b).collect())
    }

    pub fn minus(&self, o: &PortSet) -> PortSet {
        PortSet(self.0.iter().zip(&o.0).map(|(a, b)| a & !b).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// The ports as merged ranges, in order.
    pub fn ranges(&self) -> Vec<PortRange> {
        let mut out: Vec<PortRange> = Vec::new();
        for p in 0..=u16::MAX {
            if !self.contains(p) {
                continue;
            }
            match out.last_mut() {
                Some(last) if u32::from(last.last) + 1 == u32::from(p) => last.last = p,
                _ => out.push(PortRange { first: p, last: p }),
            }
        }
        out
    }

    /// In the sysctl's format: `8080,9000-9010`.
    pub fn format(&self) -> String {
        self.ranges()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Default for PortSet {
    fn default() -> Self {
        PortSet::new()
    }
}

/// Parses the sysctl's format: `8080,9000-9010` (empty: nothing).
pub fn parse_list(s: &str) -> Option<Vec<PortRange>> {
    s.trim()
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse::<PortRange>().ok())
        .collect()
}

/// Merges and formats ranges in the sysctl's format.
pub fn format_list(ranges: &[PortRange]) -> String {
    PortSet::from_ranges(ranges).format()
}

/// The calling thread's netns (a thread may have entered another one than the process's).
fn netns() -> Result<u64, EphemeralError> {
    let p = Path::new("/proc/thread-self/ns/net");
    Ok(fs::metadata(p).map(|m| m.ino()).at("stat", p)?)
}

/// The saved-state file for a pin dir in the netns with inode `netns` (None: the name of older
/// daemons, which protected one netns only).
fn state_file(pin_dir: &Path, netns: Option<u64>) -> PathBuf {
    match netns {
        Some(n) => state::path(pin_dir, &format!("reserved_ports.{n}")),
        None => state::path(pin_dir, "reserved_ports"),
    }
}

/// Every saved-state file of a pin dir.
fn state_files(pin_dir: &Path) -> Result<Vec<PathBuf>, EphemeralError> {
    let legacy = state_file(pin_dir, None);
    let prefix = legacy
        .file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned();
    let dir = Path::new(state::STATE_DIR);
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(IoError::new("read", dir, e).into()),
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry
            .at("read", dir)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let ours = name == prefix
            || name
                .strip_prefix(&format!("{prefix}."))
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if ours {
            out.push(dir.join(name));
        }
    }
    out.sort();
    Ok(out)
}

/// What an earlier apply recorded: its netns, and the ports it added (older daemons recorded
/// the whole previous value instead: `previous`).
struct State {
    netns: u64,
    added: Option<PortSet>,
    previous: Option<String>,
    /// A path that opens the netns, for an `unload` run elsewhere.
    path: Option<PathBuf>,
}

fn trusted(path: &Path, m: &fs::Metadata, dir: bool) -> Result<(), EphemeralError> {
    let kind_ok = if dir { m.is_dir() } else { m.is_file() };
    if !kind_ok || m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(EphemeralError::Untrusted {
            path: path.to_owned(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

fn load(path: &Path) -> Result<Option<State>, EphemeralError> {
    let path = path.to_owned();
    // O_NOFOLLOW: a link planted at the path is refused, not followed.
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IoError::new("open", path, e).into()),
    };
    trusted(&path, &file.metadata().at("stat", &path)?, false)?;
    let text = io::read_to_string(file).at("read", &path)?;
    let mut state = State {
        netns: 0,
        added: None,
        previous: None,
        path: None,
    };
    let mut netns = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("netns=") {
            netns = v.parse::<u64>().ok();
        } else if let Some(v) = line.strip_prefix("added=") {
            state.added = Some(PortSet::from_ranges(
                &parse_list(v).ok_or_else(|| EphemeralError::BadState(path.clone()))?,
            ));
        } else if let Some(v) = line.strip_prefix("previous=") {
            parse_list(v).ok_or_else(|| EphemeralError::BadState(path.clone()))?;
            state.previous = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("path=") {
            state.path = Some(PathBuf::from(v));
        }
    }
    match netns {
        Some(n) if state.added.is_some() || state.previous.is_some() => {
            state.netns = n;
            Ok(Some(state))
        }
        _ => Err(EphemeralError::BadState(path)),
    }
}

fn save(
    pin_dir: &Path,
    netns: u64,
    added: &PortSet,
    ns_path: Option<&Path>,
) -> Result<(), EphemeralError> {
    let mut text = format!("netns={netns}\nadded={}\n", added.format());
    if let Some(p) = ns_path {
        text.push_str(&format!("path={}\n", p.display()));
    }
    Ok(state::write(
        &state_file(pin_dir, Some(netns)),
        &text,
        0o600,
    )?)
}

fn read_sysctl() -> Result<PortSet, EphemeralError> {
    let p = Path::new(SYSCTL);
    let text = fs::read_to_string(p).at("read", p)?;
    let ranges = parse_list(&text).ok_or_else(|| {
        IoError::new(
            "parse",
            p,
            io::Error::new(io::ErrorKind::InvalidData, text.trim().to_owned()),
        )
    })?;
    Ok(PortSet::from_ranges(&ranges))
}

fn write_sysctl(value: &str) -> Result<(), EphemeralError> {
    let p = Path::new(SYSCTL);
    // An empty write is refused by the kernel's parser; a lone newline clears the list.
    Ok(fs::write(p, format!("{value}\n")).at("write", p)?)
}

/// Merges `ranges` into the sysctl of the calling thread's netns and records the ports this
/// adds (with `ns_path`, a path that opens this netns, for an `unload` run in another). A
/// restart or reload keeps what was recorded before, drops from the sysctl the ports it added
/// for ranges no longer reserved, and adds what the new ranges need. Returns the new value.
pub fn apply(
    pin_dir: &Path,
    ranges: &[PortRange],
    ns_path: Option<&Path>,
) -> Result<String, EphemeralError> {
    let current_ns = netns()?;
    let ours = PortSet::from_ranges(ranges);
    let now = read_sysctl()?;
    // This netns's record, or an older daemon's one-netns record if it is this netns's.
    let legacy = state_file(pin_dir, None);
    let legacy_state = load(&legacy)?.filter(|s| s.netns == current_ns);
    let state = match load(&state_file(pin_dir, Some(current_ns)))? {
        Some(s) => Some(s),
        None => legacy_state,
    };
    let added_before = match state {
        Some(State {
            added: Some(added), ..
        }) => added,
        // An older daemon's record: the ports its previous value did not hold were added.
        Some(State {
            previous: Some(previous),
            ..
        }) => {
            let before = PortSet::from_ranges(&parse_list(&previous).unwrap_or_default());
            now.minus(&before)
        }
        _ => PortSet::new(),
    };
    let stale = added_before.minus(&ours);
    let base = now.minus(&stale);
    let added = added_before.minus(&stale).union(&ours.minus(&base));
    save(pin_dir, current_ns, &added, ns_path)?;
    if load(&legacy)?.is_some_and(|s| s.netns == current_ns) {
        fs::remove_file(&legacy).at("remove", &legacy)?;
    }
    let value = base.union(&ours).format();
    write_sysctl(&value)?;
    Ok(value)
}

/// Puts back reserved ports that something else removed from the sysctl. Returns the ports it
/// put back (None when nothing was missing).
pub fn repair(ranges: &[PortRange]) -> Result<Option<String>, EphemeralError> {
    let ours = PortSet::from_ranges(ranges);
    let now = read_sysctl()?;
    let lost = ours.minus(&now);
    if lost.is_empty() {
        return Ok(None);
    }
    write_sysctl(&now.union(&ours).format())?;
    Ok(Some(lost.format()))
}

/// Removes the ports an apply added to the calling thread's netns, as `state` records, and the
/// record at `file`. Returns the new value.
fn restore_here(state: &State, file: &Path) -> Result<String, EphemeralError> {
    let value = match (&state.added, &state.previous) {
        (Some(added), _) => read_sysctl()?.minus(added).format(),
        // An older daemon's record: its exact previous value.
        (None, Some(previous)) => previous.clone(),
        (None, None) => unreachable!("load requires one of them"),
    };
    write_sysctl(&value)?;
    fs::remove_file(file).at("remove", file)?;
    Ok(value)
}

/// Removes the ports every apply of `pin_dir` added, in every netns it applied in, keeping
/// whatever else each sysctl holds now. Returns one line per netns, saying what it did (none
/// when nothing had been changed). A netns is reached here, through its recorded path, or
/// through any process in it; one that nothing reaches any more is forgotten when its recorded
/// path is gone (`ip netns del`: its sysctl went with it), or with `forget_unreachable`.
pub fn restore(pin_dir: &Path, forget_unreachable: bool) -> Result<Vec<String>, EphemeralError> {
    let current = netns()?;
    let mut done = Vec::new();
    for file in state_files(pin_dir)? {
        let Some(state) = load(&file)? else { continue };
        if state.netns == current {
            let value = restore_here(&state, &file)?;
            done.push(format!(
                "net.ipv4.ip_local_reserved_ports restored to {value:?}"
            ));
            continue;
        }
        let recorded = match &state.path {
            Some(path) => crate::netns::Netns::open(path)?
                .filter(|ns| ns.inode == state.netns)
                .map(|ns| (path.clone(), ns)),
            None => None,
        };
        if let Some((path, ns)) = recorded.or_else(|| crate::netns::find(state.netns)) {
            let value = ns
                .run(|| restore_here(&state, &file))
                .at("enter netns", &path)??;
            done.push(format!(
                "net.ipv4.ip_local_reserved_ports of netns {} (inode {}) restored to {value:?}",
                path.display(),
                state.netns
            ));
            continue;
        }
        match (&state.path, forget_unreachable) {
            // Its path was removed and no process is in it: gone, with its sysctl.
            (Some(path), _) => {
                fs::remove_file(&file).at("remove", &file)?;
                done.push(format!(
                    "net.ipv4.ip_local_reserved_ports of netns {} (inode {}): that netns is gone, nothing to restore",
                    path.display(),
                    state.netns
                ));
            }
            (None, true) => {
                fs::remove_file(&file).at("remove", &file)?;
                done.push(format!(
                    "net.ipv4.ip_local_reserved_ports of netns inode {}: no path or process reaches it; its saved change is forgotten (--forget-unreachable)",
                    state.netns
                ));
            }
            (None, false) => {
                return Err(EphemeralError::OtherNetns {
                    saved: state.netns,
                    current,
                })
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> PortRange {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_merges_the_sysctl_format() {
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("8080,9000-9010").unwrap().len(), 2);
        assert_eq!(parse_list("8080,x"), None);
        assert_eq!(
            format_list(&[r("49152-49215"), r("8080"), r("49200-49300"), r("49301")]),
            "8080,49152-49301"
        );
        assert_eq!(format_list(&[]), "");
        assert_eq!(format_list(&[r("65535"), r("1")]), "1,65535");
    }

    #[test]
    fn removing_what_was_added_keeps_what_others_added() {
        let before = PortSet::from_ranges(&[r("8080"), r("49200-49210")]);
        let ours = PortSet::from_ranges(&[r("49152-49215")]);
        let added = ours.minus(&before);
        assert_eq!(added.format(), "49152-49199,49211-49215");
        // Meanwhile someone adds 9000 and 49300.
        let later = before
            .union(&ours)
            .union(&PortSet::from_ranges(&[r("9000"), r("49300")]));
        assert_eq!(later.minus(&added).format(), "8080,9000,49200-49210,49300");
    }
}
