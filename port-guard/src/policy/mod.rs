//! The validated policy: what the guard enforces, independent of where it came from (config file
//! or flags). Parsing here is pure and unit-tested; cgroup paths are resolved against the system
//! in [`crate::config`].

mod netns;

use std::{fmt, str::FromStr};

use port_guard_common::{MAX_ALLOWED, MAX_RANGES, PROTO_TCP, PROTO_UDP};

pub use self::netns::{NetnsScope, NetnsSpec};
use crate::cgroup::CgroupPath;

/// A bad value in the configuration or on the command line (exit status 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// A port that is not a number in 1..=65535.
    #[error("invalid port {value:?} in range {spec:?}: expected a number from 1 to 65535")]
    Port { spec: String, value: String },
    /// A range whose end is below its start.
    #[error("invalid range {spec:?}: {first} is above {last}; write it as {last}-{first}")]
    Reversed { spec: String, first: u16, last: u16 },
    /// A protocol other than tcp and udp.
    #[error("unknown protocol {value:?} in {spec:?}: expected tcp, udp or tcp+udp")]
    Protocol { spec: String, value: String },
    /// An empty protocol list.
    #[error("range {spec:?} has no protocol: expected tcp, udp or both")]
    NoProtocol { spec: String },
    /// Two ranges share ports.
    #[error("ranges {a:?} and {b:?} overlap: every port may belong to one range only")]
    Overlap { a: String, b: String },
    /// More ranges than the kernel map has slots for.
    #[error("{count} reserved ranges configured; at most {max} are supported")]
    TooManyRanges { count: usize, max: usize },
    /// More allowed cgroups than the kernel map holds.
    #[error("{count} allowed cgroups configured; at most {max} are supported")]
    TooManyAllowed { count: usize, max: u32 },
    /// An unknown mode.
    #[error("unknown mode {0:?}: expected enforce or audit")]
    Mode(String),
    /// An unknown errno name.
    #[error("unknown errno {0:?}: expected eperm, eacces or eaddrinuse")]
    Errno(String),
    /// Something that names no network namespace.
    #[error("invalid netns {0:?}: expected host, all, or the absolute path of a netns file (/run/netns/NAME, /proc/PID/ns/net)")]
    Netns(String),
    /// `all` with others.
    #[error("netns \"all\" covers every network namespace: list it alone")]
    NetnsAllWithOthers,
    /// An empty list.
    #[error("netns lists no network namespace: expected [\"host\"], [\"all\"] or netns paths")]
    NoNetns,
    /// A sentinel port inside a reserved range.
    #[error("sentinel_port {port} is inside the reserved range {range}: it must be a port of its own (0 turns the sentinel off)")]
    SentinelInRange { port: u16, range: String },
    /// A sentinel port unprivileged processes could not be sent to.
    #[error("sentinel_port {0} is below 1024: a refused bind rewritten to it would fail with EACCES, not EADDRINUSE; choose one from 1024 to 65535 (0 turns the sentinel off)")]
    SentinelPrivileged(u16),
    /// A per-child limit out of bounds.
    #[error("per_child_limit {0} is out of range: expected 1 to 65535 sockets per child of an allowed cgroup (leave it out for no limit)")]
    Limit(u32),
    /// `--per-child-limit` while the ranges come from the file.
    #[error("--per-child-limit applies to the ranges given by --reserve (or the default range); the config file's ranges take per_child_limit in their [[reserve]] table")]
    LimitFlagWithFileRanges,
}

/// An inclusive port range, 1..=65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

fn parse_port(spec: &str, value: &str) -> Result<u16, PolicyError> {
    let err = || PolicyError::Port {
        spec: spec.to_owned(),
        value: value.to_owned(),
    };
    // u16::from_str accepts a leading '+'; a port is digits only.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    match value.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(err()),
    }
}

impl FromStr for PortRange {
    type Err = PolicyError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (a, b) = match spec.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (spec.trim(), spec.trim()),
        };
        let first = parse_port(spec, a)?;
        let last = parse_port(spec, b)?;
        if first > last {
            return Err(PolicyError::Reversed {
                spec: spec.to_owned(),
                first,
                last,
            });
        }
        Ok(PortRange { first, last })
    }
}

/// tcp, udp or both, as the bits the kernel map uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protocols(pub u16);

impl Protocols {
    pub const TCP: Protocols = Protocols(PROTO_TCP);
    pub const UDP: Protocols = Protocols(PROTO_UDP);

    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.0 & PROTO_TCP != 0 {
            v.push("tcp");
        }
        if self.0 & PROTO_UDP != 0 {
            v.push("udp");
        }
        v
    }

    /// Parses one protocol name of `spec`.
    pub fn parse_one(spec: &str, name: &str) -> Result<Protocols, PolicyError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocols::TCP),
            "udp" => Ok(Protocols::UDP),
            _ => Err(PolicyError::Protocol {
                spec: spec.to_owned(),
                value: name.to_owned(),
            }),
        }
    }

    /// Parses a list of names (`["tcp", "udp"]` or the parts of `tcp+udp`).
    pub fn parse_list<'a>(
        spec: &str,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Protocols, PolicyError> {
        let mut bits = 0;
        for name in names {
            bits |= Protocols::parse_one(spec, name)?.0;
        }
        if bits == 0 {
            return Err(PolicyError::NoProtocol {
                spec: spec.to_owned(),
            });
        }
        Ok(Protocols(bits))
    }
}

impl fmt::Display for Protocols {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join("+"))
    }
}

/// A `--reserve` argument: `A-B[/tcp|udp|tcp+udp]`, tcp when no protocol is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReserveSpec {
    pub range: PortRange,
    pub protocols: Protocols,
}

impl FromStr for ReserveSpec {
    type Err = PolicyError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (ports, protos) = match spec.split_once('/') {
            Some((p, q)) => (p, Some(q)),
            None => (spec, None),
        };
        let range = ports.parse::<PortRange>().map_err(|e| match e {
            PolicyError::Port { value, .. } => PolicyError::Port {
                spec: spec.to_owned(),
                value,
            },
            other => other,
        })?;
        let protocols = match protos {
            None => Protocols::TCP,
            Some(q) => Protocols::parse_list(spec, q.split('+'))?,
        };
        Ok(ReserveSpec { range, protocols })
    }
}

impl fmt::Display for ReserveSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.range, self.protocols)
    }
}

/// What a refused bind returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Errno {
    Eperm,
    Eacces,
    #[default]
    Eaddrinuse,
}

impl Errno {
    pub fn raw(self) -> u32 {
        (match self {
            Errno::Eperm => libc::EPERM,
            Errno::Eacces => libc::EACCES,
            Errno::Eaddrinuse => libc::EADDRINUSE,
        }) as u32
    }

    pub fn from_raw(raw: u32) -> Option<Errno> {
        [Errno::Eperm, Errno::Eacces, Errno::Eaddrinuse]
            .into_iter()
            .find(|e| e.raw() == raw)
    }

    /// Lowercase config name.
    pub fn name(self) -> &'static str {
        match self {
            Errno::Eperm => "eperm",
            Errno::Eacces => "eacces",
            Errno::Eaddrinuse => "eaddrinuse",
        }
    }

    /// Uppercase C name, as in the denial log line.
    pub fn c_name(self) -> &'static str {
        match self {
            Errno::Eperm => "EPERM",
            Errno::Eacces => "EACCES",
            Errno::Eaddrinuse => "EADDRINUSE",
        }
    }
}

impl FromStr for Errno {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "eperm" => Ok(Errno::Eperm),
            "eacces" => Ok(Errno::Eacces),
            "eaddrinuse" => Ok(Errno::Eaddrinuse),
            _ => Err(PolicyError::Errno(s.to_owned())),
        }
    }
}

/// enforce: refuse; audit: report what would be refused and refuse nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl FromStr for Mode {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "enforce" => Ok(Mode::Enforce),
            "audit" => Ok(Mode::Audit),
            _ => Err(PolicyError::Mode(s.to_owned())),
        }
    }
}

/// One reserved range and the cgroups allowed to bind its unleased ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub spec: ReserveSpec,
    pub allow: Vec<CgroupPath>,
    /// The most sockets bound to ports of the range that one child of an allowed cgroup (a VM's
    /// scope) may hold at once; 0: no limit. Leased ports are not counted.
    pub per_child_limit: u32,
}

/// Everything the guard enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub attach: CgroupPath,
    pub mode: Mode,
    pub errno: Errno,
    pub protect_ephemeral: bool,
    /// Start even when the kernel cannot give refused binds the configured errno (EPERM then).
    pub allow_fallback: bool,
    pub spawn_parent: CgroupPath,
    pub reserve: Vec<Reservation>,
    /// Where the guard enforces.
    pub netns: NetnsScope,
    /// The port refused binds are rewritten to where the kernel cannot set their errno (0: no
    /// sentinel).
    pub sentinel_port: u16,
}

/// The sentinel port when the config names none: 49151 (just below libvirt's default range),
/// unless a range covers it; then the nearest free port below the lowest range (from 1024), else
/// above the highest.
pub fn default_sentinel_port(reserve: &[Reservation]) -> u16 {
    let covered = |p: u16| reserve.iter().any(|r| r.spec.range.contains(p));
    if !covered(49151) {
        return 49151;
    }
    let lowest = reserve
        .iter()
        .map(|r| r.spec.range.first)
        .min()
        .unwrap_or(49152);
    if let Some(p) = (1024..lowest).rev().find(|p| !covered(*p)) {
        return p;
    }
    let highest = reserve
        .iter()
        .map(|r| r.spec.range.last)
        .max()
        .unwrap_or(49215);
    (highest.saturating_add(1)..=65535)
        .find(|p| !covered(*p))
        .unwrap_or(0)
}

/// Checks a configured sentinel port against the ranges (0, no sentinel, always passes).
pub fn check_sentinel(port: u16, reserve: &[Reservation]) -> Result<(), PolicyError> {
    if port == 0 {
        return Ok(());
    }
    if port < 1024 {
        return Err(PolicyError::SentinelPrivileged(port));
    }
    if let Some(r) = reserve.iter().find(|r| r.spec.range.contains(port)) {
        return Err(PolicyError::SentinelInRange {
            port,
            range: r.spec.to_string(),
        });
    }
    Ok(())
}

/// The default range: libvirt's migration_port_min..migration_port_max.
pub const DEFAULT_RESERVE: ReserveSpec = ReserveSpec {
    range: PortRange {
        first: 49152,
        last: 49215,
    },
    protocols: Protocols::TCP,
};

/// Checks the ranges together: no overlap, no more than the kernel map holds.
pub fn check_ranges(reserve: &[Reservation]) -> Result<(), PolicyError> {
    if reserve.len() > MAX_RANGES {
        return Err(PolicyError::TooManyRanges {
            count: reserve.len(),
            max: MAX_RANGES,
        });
    }
    let mut allowed: Vec<&CgroupPath> = reserve.iter().flat_map(|r| &r.allow).collect();
    allowed.sort();
    allowed.dedup();
    if allowed.len() > MAX_ALLOWED as usize {
        return Err(PolicyError::TooManyAllowed {
            count: allowed.len(),
            max: MAX_ALLOWED,
        });
    }
    let mut sorted: Vec<&ReserveSpec> = reserve.iter().map(|r| &r.spec).collect();
    sorted.sort_by_key(|s| s.range);
    for pair in sorted.windows(2) {
        if pair[0].range.overlaps(&pair[1].range) {
            return Err(PolicyError::Overlap {
                a: pair[0].to_string(),
                b: pair[1].to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Result<ReserveSpec, PolicyError> {
        s.parse()
    }

    #[test]
    fn parses_ranges_and_protocols() {
        let r = spec("49152-49215").unwrap();
        assert_eq!((r.range.first, r.range.last), (49152, 49215));
        assert_eq!(r.protocols, Protocols::TCP);
        assert_eq!(
            spec("5000/udp").unwrap().range,
            PortRange {
                first: 5000,
                last: 5000
            }
        );
        assert_eq!(spec("5000/udp").unwrap().protocols, Protocols::UDP);
        assert_eq!(
            spec("6000-6010/tcp+udp").unwrap().protocols.0,
            PROTO_TCP | PROTO_UDP
        );
        assert_eq!(spec("6000-6010/TCP").unwrap().protocols, Protocols::TCP);
        assert_eq!(spec("65535").unwrap().range.last, 65535);
        assert_eq!(spec("1-65535").unwrap().range.ports().count(), 65535);
    }

    #[test]
    fn rejects_bad_ports_naming_the_value() {
        for (input, value) in [
            ("0", "0"),
            ("70000", "70000"),
            ("0-10", "0"),
            ("10-65536", "65536"),
            ("abc", "abc"),
            ("+80", "+80"),
            ("-5", ""),
            ("", ""),
            ("80-", ""),
        ] {
            match spec(input) {
                Err(PolicyError::Port { spec, value: v }) => {
                    assert_eq!(spec, input);
                    assert_eq!(v, value, "{input}");
                }
                other => panic!("{input}: {other:?}"),
            }
        }
        let msg = spec("70000").unwrap_err().to_string();
        assert!(
            msg.contains("\"70000\"") && msg.contains("1 to 65535"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_reversed_and_unknown_protocols() {
        assert!(matches!(
            spec("5000-4000"),
            Err(PolicyError::Reversed {
                first: 5000,
                last: 4000,
                ..
            })
        ));
        assert!(
            matches!(spec("5000/sctp"), Err(PolicyError::Protocol { value, .. }) if value == "sctp")
        );
        assert!(matches!(spec("5000/"), Err(PolicyError::Protocol { .. })));
        assert!(matches!(
            spec("5000/tcp+"),
            Err(PolicyError::Protocol { .. })
        ));
    }

    #[test]
    fn rejects_overlaps_and_too_many_ranges() {
        let res = |s: &str| Reservation {
            per_child_limit: 0,
            spec: spec(s).unwrap(),
            allow: vec![],
        };
        assert!(check_ranges(&[res("100-200"), res("201-300")]).is_ok());
        let e = check_ranges(&[res("250-400/udp"), res("100-250")]).unwrap_err();
        assert_eq!(
            e,
            PolicyError::Overlap {
                a: "100-250/tcp".into(),
                b: "250-400/udp".into()
            }
        );
        let many: Vec<_> = (0..=MAX_RANGES as u16)
            .map(|i| res(&(1000 + i).to_string()))
            .collect();
        assert!(matches!(
            check_ranges(&many),
            Err(PolicyError::TooManyRanges { .. })
        ));
        assert!(check_ranges(&many[..MAX_RANGES]).is_ok());
    }

    #[test]
    fn parses_mode_and_errno() {
        assert_eq!("audit".parse::<Mode>().unwrap(), Mode::Audit);
        assert_eq!("EADDRINUSE".parse::<Errno>().unwrap(), Errno::Eaddrinuse);
        assert_eq!(
            "eacces".parse::<Errno>().unwrap().raw(),
            libc::EACCES as u32
        );
        assert_eq!(Errno::from_raw(libc::EPERM as u32), Some(Errno::Eperm));
        assert_eq!(
            "block".parse::<Mode>().unwrap_err(),
            PolicyError::Mode("block".into())
        );
        assert!("enoent"
            .parse::<Errno>()
            .unwrap_err()
            .to_string()
            .contains("\"enoent\""));
    }
}
