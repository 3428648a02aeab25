//! Keeping the kernel from auto-picking reserved ports.
//!
//! The bind hook never sees ports the kernel chooses itself (connect() without bind(), UDP
//! sendto(), bind() to port 0). net.ipv4.ip_local_reserved_ports, per network namespace and
//! covering IPv6 and UDP too, keeps those choices out of the reserved ranges. The ranges are
//! merged into whatever the sysctl held; the previous value is saved first, in a file under
//! /run that outlives a daemon crash (and, like the sysctl itself, not a reboot), and `unload`
//! writes it back exactly.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{guard::PinDir, policy::PortRange};

const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const STATE_DIR: &str = "/run/port-guard";

/// An ephemeral-port protection problem (runtime, exit 1).
#[derive(Debug, thiserror::Error)]
pub enum EphemeralError {
    /// Reading or writing the sysctl or the saved state failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The protection was applied in another network namespace.
    #[error("net.ipv4.ip_local_reserved_ports was changed in network namespace net:[{saved}], this process is in net:[{current}]: run this in that namespace")]
    OtherNetns { saved: u64, current: u64 },
    /// The saved state file is not ours or is damaged.
    #[error(
        "cannot understand {0}; restore net.ipv4.ip_local_reserved_ports by hand and remove it"
    )]
    BadState(PathBuf),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> EphemeralError + 'a {
    move |source| EphemeralError::Io {
        op,
        path: path.to_owned(),
        source,
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
    let mut v = ranges.to_vec();
    v.sort();
    let mut merged: Vec<PortRange> = Vec::new();
    for r in v {
        match merged.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last)
            }
            _ => merged.push(r),
        }
    }
    merged
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn netns() -> Result<u64, EphemeralError> {
    let p = Path::new("/proc/self/ns/net");
    fs::metadata(p).map(|m| m.ino()).map_err(io_err("stat", p))
}

/// The saved-state file for a pin dir.
fn state_file(pin: &PinDir) -> PathBuf {
    let name: String = pin
        .path()
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
    Path::new(STATE_DIR).join(format!("{name}.reserved_ports"))
}

/// (netns, previous value) saved by an earlier apply.
fn load(pin: &PinDir) -> Result<Option<(u64, String)>, EphemeralError> {
    let path = state_file(pin);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let mut netns = None;
    let mut previous = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("netns=") {
            netns = v.parse::<u64>().ok();
        } else if let Some(v) = line.strip_prefix("previous=") {
            previous = Some(v.to_owned());
        }
    }
    match (netns, previous) {
        (Some(n), Some(p)) if parse_list(&p).is_some() => Ok(Some((n, p))),
        _ => Err(EphemeralError::BadState(path)),
    }
}

fn read_sysctl() -> Result<String, EphemeralError> {
    let p = Path::new(SYSCTL);
    fs::read_to_string(p)
        .map(|s| s.trim_end_matches('\n').to_owned())
        .map_err(io_err("read", p))
}

fn write_sysctl(value: &str) -> Result<(), EphemeralError> {
    let p = Path::new(SYSCTL);
    // An empty write is refused by the kernel's parser; a lone newline clears the list.
    fs::write(p, format!("{value}\n")).map_err(io_err("write", p))
}

/// Merges `ranges` into the sysctl, saving the value it had first (once: a restart after a crash
/// keeps the original). Returns the new value.
pub fn apply(pin: &PinDir, ranges: &[PortRange]) -> Result<String, EphemeralError> {
    let current = netns()?;
    let previous = match load(pin)? {
        Some((saved, _)) if saved != current => {
            return Err(EphemeralError::OtherNetns { saved, current })
        }
        Some((_, previous)) => previous,
        None => {
            let previous = read_sysctl()?;
            let dir = Path::new(STATE_DIR);
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            let path = state_file(pin);
            let tmp = path.with_extension("tmp");
            fs::write(&tmp, format!("netns={current}\nprevious={previous}\n"))
                .map_err(io_err("write", &tmp))?;
            fs::rename(&tmp, &path).map_err(io_err("rename to", &path))?;
            previous
        }
    };
    let mut all = parse_list(&previous).unwrap_or_default();
    all.extend_from_slice(ranges);
    let value = format_list(&all);
    write_sysctl(&value)?;
    Ok(value)
}

/// Writes the saved value back and forgets it. Returns the restored value, or None when nothing
/// was changed.
pub fn restore(pin: &PinDir) -> Result<Option<String>, EphemeralError> {
    let Some((saved, previous)) = load(pin)? else {
        return Ok(None);
    };
    let current = netns()?;
    if saved != current {
        return Err(EphemeralError::OtherNetns { saved, current });
    }
    write_sysctl(&previous)?;
    let path = state_file(pin);
    fs::remove_file(&path).map_err(io_err("remove", &path))?;
    Ok(Some(previous))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_merges_the_sysctl_format() {
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("8080,9000-9010").unwrap().len(), 2);
        assert_eq!(parse_list("8080,x"), None);
        let r = |s: &str| s.parse::<PortRange>().unwrap();
        assert_eq!(
            format_list(&[r("49152-49215"), r("8080"), r("49200-49300"), r("49301")]),
            "8080,49152-49301"
        );
        assert_eq!(format_list(&[]), "");
    }
}
