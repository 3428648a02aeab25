//! The guarded network namespaces while the daemon runs: `host` learnt once, paths followed like
//! allowed cgroups (a named netns created later is guarded when it appears, and one removed and
//! created anew is followed), the set written to `PG_NETNS`, and recorded for `spawn`, `lease`
//! and `check` under /run/port-guard.
//!
//! Fail closed: while a listed netns exists whose cookie could not be learnt, the guard enforces
//! in every netns rather than leave that one open.

use std::{collections::BTreeMap, path::PathBuf};

use log::{info, warn};

use crate::{
    cgroup::{Cgroup2, CgroupPath},
    error::IoError,
    guard::{Guard, GuardError},
    netns::{self, Netns},
    pin::PinDir,
    policy::{NetnsScope, NetnsSpec},
};

/// A listed netns as last seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Found {
    inode: u64,
    cookie: u64,
}

#[derive(Clone)]
struct Entry {
    spec: NetnsSpec,
    found: Option<Found>,
    /// It exists but its cookie could not be learnt (said once).
    failing: bool,
}

/// What the daemon enforces in.
#[derive(Clone)]
pub(super) struct GuardedNetns {
    all: bool,
    /// The kernel can tell namespaces apart (bpf_get_netns_cookie).
    supported: bool,
    /// The daemon's own netns.
    host: Found,
    entries: Vec<Entry>,
}

/// Where `spawn`, `lease` and `check` find the guarded namespaces of a pin dir.
pub fn state_file(pin: &PinDir) -> PathBuf {
    crate::state::path(pin.path(), "netns")
}

impl GuardedNetns {
    /// Learns the daemon's own netns and resolves `scope`.
    pub(super) fn new(
        scope: &NetnsScope,
        supported: bool,
        guard: &mut Guard,
        cg: &Cgroup2,
        scratch: &CgroupPath,
    ) -> Result<GuardedNetns, GuardError> {
        let own = Netns::own()?;
        let host = Found {
            inode: own.inode,
            cookie: if supported {
                guard.cookie_of(cg, scratch, &own)?
            } else {
                0
            },
        };
        let mut g = GuardedNetns {
            all: true,
            supported,
            host,
            entries: Vec::new(),
        };
        g.set_scope(scope);
        Ok(g)
    }

    /// A new scope (a reload): what is already known stays known.
    pub(super) fn set_scope(&mut self, scope: &NetnsScope) {
        self.all = matches!(scope, NetnsScope::All);
        let old = std::mem::take(&mut self.entries);
        self.entries = scope
            .specs()
            .iter()
            .map(|spec| {
                old.iter()
                    .find(|e| &e.spec == spec)
                    .map(|e| Entry {
                        spec: spec.clone(),
                        found: e.found,
                        failing: e.failing,
                    })
                    .unwrap_or(Entry {
                        spec: spec.clone(),
                        found: (spec == &NetnsSpec::Host).then_some(self.host),
                        failing: false,
                    })
            })
            .collect();
    }

    /// Looks at every listed path again. Returns whether the set changed.
    ///
    /// Returns whether the set changed, and the lines that announce a netns now guarded: the
    /// caller logs them once what they say is true (the cookie in `PG_NETNS`, and before 6.1
    /// the sentinel holding its port there).
    pub(super) fn refresh(
        &mut self,
        guard: &mut Guard,
        cg: &Cgroup2,
        scratch: &CgroupPath,
    ) -> (bool, Vec<String>) {
        let mut news = Vec::new();
        if !self.supported {
            return (false, news);
        }
        let mut changed = false;
        for e in &mut self.entries {
            let NetnsSpec::Path(path) = &e.spec else {
                continue;
            };
            match Netns::open(path) {
                Ok(None) => {
                    if e.found.take().is_some() {
                        info!(
                            "guarded netns {} is gone; binds there are no longer checked",
                            e.spec.name()
                        );
                        changed = true;
                    }
                    if std::mem::take(&mut e.failing) {
                        changed = true;
                    }
                }
                Ok(Some(ns)) if e.found.is_some_and(|f| f.inode == ns.inode) => {}
                Ok(Some(ns)) => match guard.cookie_of(cg, scratch, &ns) {
                    Ok(cookie) => {
                        news.push(format!(
                            "guarded netns {} {} (inode {}); binds there are checked",
                            e.spec.name(),
                            if e.found.is_some() {
                                "was created anew"
                            } else {
                                "appeared"
                            },
                            ns.inode
                        ));
                        e.found = Some(Found {
                            inode: ns.inode,
                            cookie,
                        });
                        e.failing = false;
                        changed = true;
                    }
                    Err(err) => {
                        if !e.failing {
                            warn!("guarded netns {}: cannot learn its cookie ({err}); the guard enforces in every netns until it can", e.spec.name());
                            e.failing = true;
                            changed = true;
                        }
                    }
                },
                Err(err) => {
                    // Not evidence that it is gone: as it was, and said once.
                    if !e.failing {
                        warn!(
                            "guarded netns {}: {err}; looking again every second",
                            e.spec.name()
                        );
                        e.failing = true;
                    }
                }
            }
        }
        (changed, news)
    }

    /// Whether the guard is scoped to the set (else it enforces in every netns).
    pub(super) fn scoped(&self) -> bool {
        self.supported && !self.all && !self.entries.iter().any(|e| e.failing)
    }

    /// The guarded set: cookie → inode.
    pub(super) fn set(&self) -> BTreeMap<u64, u64> {
        self.entries
            .iter()
            .filter_map(|e| e.found.map(|f| (f.cookie, f.inode)))
            .collect()
    }

    /// Names for log lines: (cookie, inode, name) of the host and every guarded netns.
    pub(super) fn names(&self) -> Vec<(u64, u64, String)> {
        let mut v = vec![(self.host.cookie, self.host.inode, "host".to_owned())];
        for e in &self.entries {
            if let (Some(f), NetnsSpec::Path(_)) = (e.found, &e.spec) {
                v.push((f.cookie, f.inode, e.spec.name()));
            }
        }
        v
    }

    /// Where ephemeral protection goes: this netns (None) when the host is guarded or every netns
    /// is, and each present listed netns by its path.
    pub(super) fn protected(&self) -> Vec<Option<(String, PathBuf)>> {
        let mut v = Vec::new();
        if !self.scoped() || self.entries.iter().any(|e| e.spec == NetnsSpec::Host) {
            v.push(None);
        }
        if self.scoped() {
            for e in &self.entries {
                if let (Some(_), NetnsSpec::Path(p)) = (e.found, &e.spec) {
                    v.push(Some((e.spec.name(), p.clone())));
                }
            }
        }
        v
    }

    /// Where sentinels go, as (name, inode, cookie, path to enter it or None for the daemon's
    /// own): wherever ephemeral protection goes.
    pub(super) fn sentinel_targets(&self) -> Vec<(String, u64, u64, Option<PathBuf>)> {
        let mut v = Vec::new();
        if !self.scoped() || self.entries.iter().any(|e| e.spec == NetnsSpec::Host) {
            v.push(("host".to_owned(), self.host.inode, self.host.cookie, None));
        }
        if self.scoped() {
            for e in &self.entries {
                if let (Some(f), NetnsSpec::Path(p)) = (e.found, &e.spec) {
                    if f.inode != self.host.inode {
                        v.push((e.spec.name(), f.inode, f.cookie, Some(p.clone())));
                    }
                }
            }
        }
        v
    }

    /// One line for the start-up log.
    pub(super) fn describe(&self) -> String {
        if !self.supported {
            return "all (this kernel cannot tell network namespaces apart)".into();
        }
        if self.all {
            return "all".into();
        }
        self.entries
            .iter()
            .map(|e| match e.found {
                Some(f) => format!("{}(inode {})", e.spec.name(), f.inode),
                None => format!("{}(not yet)", e.spec.name()),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Records the guarded namespaces for `spawn`, `lease` and `check`: `all`, or one line per
    /// present netns, `INODE PATH NAME`, PATH one that opens it (its `ip netns` file, the
    /// configured path, or this daemon's /proc entry for the host).
    pub(super) fn record(&self, pin: &PinDir) -> Result<(), IoError> {
        let mut text = String::new();
        if !self.scoped() {
            text.push_str("all\n");
        } else {
            for e in &self.entries {
                let Some(f) = e.found else { continue };
                let path = match &e.spec {
                    NetnsSpec::Host => netns::path_of(f.inode),
                    NetnsSpec::Path(p) => p.clone(),
                };
                text.push_str(&format!(
                    "{} {} {}\n",
                    f.inode,
                    path.display(),
                    e.spec.name()
                ));
            }
        }
        crate::state::write(&state_file(pin), &text, 0o644)
    }
}
