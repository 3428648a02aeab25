//! Which network namespaces the guard enforces in. Ports are per netns: a container with a netns
//! of its own takes nothing from the host's port space, so by default the guard enforces only in
//! the daemon's own netns (under systemd, the host's).

use std::{fmt, path::PathBuf, str::FromStr};

use super::PolicyError;

/// One guarded netns, as configured.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NetnsSpec {
    /// The daemon's own netns.
    Host,
    /// A netns file (`/run/netns/NAME`, `/proc/PID/ns/net`), followed by path: guarded once it
    /// exists, and again when it is created anew.
    Path(PathBuf),
}

impl NetnsSpec {
    /// How log lines and `status` name it: `host`, a `/run/netns` name, or the path.
    pub fn name(&self) -> String {
        match self {
            NetnsSpec::Host => "host".into(),
            NetnsSpec::Path(p) => match p.strip_prefix("/run/netns") {
                Ok(name) if name.components().count() == 1 => name.display().to_string(),
                _ => p.display().to_string(),
            },
        }
    }
}

impl fmt::Display for NetnsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetnsSpec::Host => f.write_str("host"),
            NetnsSpec::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl FromStr for NetnsSpec {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PolicyError::Netns(s.to_owned());
        match s {
            "host" => Ok(NetnsSpec::Host),
            p if p.starts_with('/') && !p.contains('\0') && !p.split('/').any(|c| c == "..") => {
                Ok(NetnsSpec::Path(PathBuf::from(p)))
            }
            _ => Err(bad()),
        }
    }
}

/// Where the guard enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsScope {
    /// Every netns (the guard before namespaces were told apart).
    All,
    /// These, at least one.
    Listed(Vec<NetnsSpec>),
}

impl Default for NetnsScope {
    fn default() -> Self {
        NetnsScope::Listed(vec![NetnsSpec::Host])
    }
}

impl NetnsScope {
    /// From the config's or the flags' list: `all` alone, or `host` and paths.
    pub fn parse_list<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Self, PolicyError> {
        let values: Vec<&str> = values.into_iter().collect();
        if values.is_empty() {
            return Err(PolicyError::NoNetns);
        }
        if values.contains(&"all") {
            if values.len() > 1 {
                return Err(PolicyError::NetnsAllWithOthers);
            }
            return Ok(NetnsScope::All);
        }
        let mut specs = Vec::new();
        for v in values {
            let spec: NetnsSpec = v.parse()?;
            if !specs.contains(&spec) {
                specs.push(spec);
            }
        }
        Ok(NetnsScope::Listed(specs))
    }

    /// The listed namespaces (none for `all`).
    pub fn specs(&self) -> &[NetnsSpec] {
        match self {
            NetnsScope::All => &[],
            NetnsScope::Listed(v) => v,
        }
    }
}

impl fmt::Display for NetnsScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetnsScope::All => f.write_str("all"),
            NetnsScope::Listed(v) => {
                let names: Vec<String> = v.iter().map(ToString::to_string).collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_all_and_paths() {
        assert_eq!(
            NetnsScope::default(),
            NetnsScope::Listed(vec![NetnsSpec::Host])
        );
        assert_eq!(NetnsScope::parse_list(["all"]), Ok(NetnsScope::All));
        let s = NetnsScope::parse_list(["host", "/run/netns/blue", "host"]).unwrap();
        assert_eq!(
            s.specs(),
            [NetnsSpec::Host, NetnsSpec::Path("/run/netns/blue".into())]
        );
        assert_eq!(s.specs()[1].name(), "blue");
        assert_eq!(
            NetnsSpec::Path("/proc/42/ns/net".into()).name(),
            "/proc/42/ns/net"
        );
        assert_eq!(s.to_string(), "host,/run/netns/blue");
    }

    #[test]
    fn refuses_what_names_no_netns() {
        for bad in ["", "hots", "run/netns/x", "/run/netns/../x", "/a\0b"] {
            let e = NetnsScope::parse_list([bad]).unwrap_err();
            assert_eq!(e, PolicyError::Netns(bad.into()));
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(
            NetnsScope::parse_list(["all", "host"]),
            Err(PolicyError::NetnsAllWithOthers)
        );
        assert_eq!(NetnsScope::parse_list([]), Err(PolicyError::NoNetns));
    }
}
