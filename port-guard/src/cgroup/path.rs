//! Validated cgroup paths, as in the `0::` line of /proc/PID/cgroup.

use std::{fmt, str::FromStr};

use super::CgroupError;

/// A cgroup path as in the `0::` line of /proc/PID/cgroup: `/` or `/a/b`, no `.`/`..`, no empty
/// components, no NUL, UTF-8, each component at most 255 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct CgroupPath(String);

impl CgroupPath {
    pub fn root() -> CgroupPath {
        CgroupPath("/".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Components below the root.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// The cgroup's level: 0 for the root.
    pub fn level(&self) -> u32 {
        self.components().count() as u32
    }

    /// The parent cgroup; None for the root.
    pub fn parent(&self) -> Option<CgroupPath> {
        if self.0 == "/" {
            return None;
        }
        match self.0.rfind('/') {
            Some(0) => Some(CgroupPath::root()),
            Some(i) => Some(CgroupPath(self.0[..i].to_owned())),
            None => None,
        }
    }

    /// `self/name`, validated.
    pub fn join(&self, name: &str) -> Result<CgroupPath, CgroupError> {
        if self.0 == "/" {
            format!("/{name}").parse()
        } else {
            format!("{}/{name}", self.0).parse()
        }
    }

    /// Whether `self` is `other` or below it.
    pub fn is_within(&self, other: &CgroupPath) -> bool {
        other.0 == "/" || self.0 == other.0 || self.0.starts_with(&format!("{}/", other.0))
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for CgroupPath {
    type Err = CgroupError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| CgroupError::Invalid {
            path: s.to_owned(),
            reason,
        };
        if !s.starts_with('/') {
            return Err(invalid(
                "must start with '/' (relative to the cgroup2 mount)",
            ));
        }
        if s.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        if s.len() > 4096 {
            return Err(invalid("longer than 4096 bytes"));
        }
        if s == "/" {
            return Ok(CgroupPath::root());
        }
        let trimmed = s.strip_suffix('/').unwrap_or(s);
        for c in trimmed[1..].split('/') {
            match c {
                "" => return Err(invalid("has an empty component ('//')")),
                "." | ".." => return Err(invalid("'.' and '..' components are not allowed")),
                c if c.len() > 255 => return Err(invalid("a component is longer than 255 bytes")),
                _ => {}
            }
        }
        Ok(CgroupPath(trimmed.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents() {
        let p = |s: &str| s.parse::<CgroupPath>().unwrap();
        assert_eq!(p("/machine/qemu-1").parent(), Some(p("/machine")));
        assert_eq!(p("/machine").parent(), Some(CgroupPath::root()));
        assert_eq!(CgroupPath::root().parent(), None);
    }

    #[test]
    fn validates_paths() {
        assert_eq!("/".parse::<CgroupPath>().unwrap().level(), 0);
        let p: CgroupPath = "/machine.slice/qemu-1/".parse().unwrap();
        assert_eq!(p.as_str(), "/machine.slice/qemu-1");
        assert_eq!(p.level(), 2);
        for bad in [
            "",
            "machine.slice",
            "/a/../b",
            "/a/./b",
            "/a//b",
            "/..",
            "/a\0b",
        ] {
            let e = bad.parse::<CgroupPath>().unwrap_err();
            assert!(e.is_usage());
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(format!("/{}", "x".repeat(256))
            .parse::<CgroupPath>()
            .is_err());
    }

    #[test]
    fn joins_and_nests() {
        let root = CgroupPath::root();
        let a = root.join("a").unwrap();
        let b = a.join("b").unwrap();
        assert_eq!(b.as_str(), "/a/b");
        assert!(b.is_within(&a) && b.is_within(&root) && a.is_within(&a));
        assert!(!"/ab".parse::<CgroupPath>().unwrap().is_within(&a));
        assert!(a.join("..").is_err());
    }
}
