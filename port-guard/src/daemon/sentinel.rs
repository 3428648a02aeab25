//! The daemon's sentinels ([`crate::sentinel`]): one per guarded netns it can reach, registered
//! in `PG_SENTINELS` before it binds, announced in `PG_SENT_NETNS` once it holds the port, and
//! handed to the service manager's fd store so that a restart keeps them.
//!
//! A sentinel cannot be pre-squatted: where another socket holds the configured port (bound
//! before the guard first loaded), the sentinel of that netns takes the nearest free port below
//! it instead, outside every range, marks it in `PG_PORTS` as a sentinel port (only the
//! sentinels may bind it there from then on) and announces it in `PG_SENT_NETNS`, where the
//! programs read which port to rewrite refusals to. Refused binds there keep getting
//! EADDRINUSE.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use log::{info, warn};
use port_guard_common::{MAP_SENTINELS, MAP_SENTINEL_NETNS};

use crate::{
    guard::Guard,
    netns::Netns,
    sentinel::{self, SentinelSocket, FDNAME_PREFIX},
};

/// How often a netns whose sentinel could not hold any port is tried again.
const RETRY: Duration = Duration::from_secs(5);
/// Ports tried below the configured one when another socket holds it.
const FALLBACK_TRIES: u16 = 1024;

/// A netns the sentinel should be in: (name, inode, cookie, path to enter it; None: here).
pub(super) type Target = (String, u64, u64, Option<PathBuf>);

struct Held {
    name: String,
    netns_cookie: u64,
    /// The port it holds: the configured one, or the one it took in its place.
    port: u16,
    socks: Vec<SentinelSocket>,
    /// Handed to the fd store (or came from it).
    stored: bool,
}

pub(super) struct Sentinels {
    /// The configured sentinel port.
    pub(super) port: u16,
    /// Ports a sentinel may not take in place of it: the reserved ranges.
    reserved: Vec<crate::policy::PortRange>,
    /// Ports marked as sentinel ports in `PG_PORTS`, as last written.
    marked: Option<std::collections::BTreeSet<u16>>,
    held: BTreeMap<u64, Held>,
    /// Inherited from the fd store, not yet matched to a netns: by netns inode, with the port.
    inherited: BTreeMap<u64, (u16, Vec<SentinelSocket>)>,
    sockets: HashMap<MapData, u64, u64>,
    netns: HashMap<MapData, u64, u32>,
    /// Netns (by inode) whose port was taken, and when it was last tried.
    failing: BTreeMap<u64, Instant>,
    /// A service manager keeps the sockets across restarts (`$FDSTORE` set by systemd 254+
    /// when `FileDescriptorStoreMax=` allows it).
    fd_store: bool,
    /// The first sync prunes whatever a previous daemon left in the maps.
    first: bool,
}

impl Sentinels {
    /// Takes the sentinel maps from the loaded object; adopts the sockets the service manager
    /// kept (`fds`, named `pg-sentinel-*`; others are closed).
    pub(super) fn new(
        guard: &mut Guard,
        port: u16,
        reserved: Vec<crate::policy::PortRange>,
        fds: Vec<(String, OwnedFd)>,
    ) -> anyhow::Result<Sentinels> {
        let take = |guard: &mut Guard, name: &str| {
            guard
                .ebpf
                .take_map(name)
                .ok_or_else(|| anyhow::anyhow!("the object has no {name} map"))
        };
        let sockets = HashMap::try_from(take(guard, MAP_SENTINELS)?)?;
        let netns = HashMap::try_from(take(guard, MAP_SENTINEL_NETNS)?)?;
        let mut inherited: BTreeMap<u64, (u16, Vec<SentinelSocket>)> = BTreeMap::new();
        let outside = |p: u16| p >= 1024 && !reserved.iter().any(|r| r.contains(p));
        for (name, fd) in fds {
            if !name.starts_with(FDNAME_PREFIX) {
                continue;
            }
            match sentinel::adopt(fd, outside) {
                Some((s, p)) => {
                    let e = inherited.entry(s.netns_inode).or_insert((p, Vec::new()));
                    if e.0 == p {
                        e.1.push(s);
                    } else {
                        warn!("an fd named {name} from the service manager is a sentinel on port {p}, its netns's other one on {}: closed", e.0);
                    }
                }
                None => warn!("an fd named {name} from the service manager is not a sentinel socket on a port outside the ranges: closed"),
            }
        }
        let adopted: usize = inherited.values().map(|(_, v)| v.len()).sum();
        if adopted > 0 {
            info!("took over {adopted} sentinel sockets from the service manager (its fd store)");
        }
        Ok(Sentinels {
            port,
            reserved,
            marked: None,
            held: BTreeMap::new(),
            inherited,
            sockets,
            netns,
            failing: BTreeMap::new(),
            fd_store: std::env::var("FDSTORE")
                .ok()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n > 0),
            first: true,
        })
    }

    /// Holds a port in every target netns, lets go of it elsewhere, and makes the maps say
    /// exactly that (`PG_SENTINELS`, `PG_SENT_NETNS`, the sentinel ports marked in `PG_PORTS`).
    /// A netns where no port could be held is tried again every few seconds. Returns whether
    /// the set of ports held ([`Sentinels::ports`]) changed.
    pub(super) fn sync(&mut self, targets: &[Target], maps: &mut crate::maps::Maps) -> bool {
        let ports_before = self.ports();
        let mut changed = false;
        self.failing
            .retain(|inode, _| targets.iter().any(|t| t.1 == *inode));
        let gone: Vec<u64> = self
            .held
            .keys()
            .filter(|inode| !targets.iter().any(|t| t.1 == **inode))
            .copied()
            .collect();
        for inode in gone {
            if let Some(h) = self.held.remove(&inode) {
                changed = true;
                self.release(inode, &h);
                info!(
                    "sentinel on port {} in netns {} closed (no longer guarded)",
                    h.port, h.name
                );
            }
        }
        for (name, inode, cookie, path) in targets {
            if self
                .held
                .get(inode)
                .is_some_and(|h| h.netns_cookie == *cookie && !self.in_range(h.port))
            {
                continue;
            }
            if let Some(h) = self.held.remove(inode) {
                // The same inode with another cookie cannot happen; start afresh if it does.
                self.release(*inode, &h);
            }
            if self.failing.get(inode).is_some_and(|t| t.elapsed() < RETRY) {
                continue;
            }
            changed = true;
            match self.hold(name, *inode, *cookie, path.as_ref(), maps) {
                Ok(h) => {
                    if h.port != self.port {
                        warn!("the sentinel port {} is held by another socket in netns {name}: its sentinel took port {} instead; refused binds there get EADDRINUSE through it", self.port, h.port);
                    }
                    if self.failing.remove(inode).is_some() {
                        info!("sentinel port {} in netns {name} is held again: refused binds there get EADDRINUSE", h.port);
                    }
                    self.held.insert(*inode, h);
                }
                Err(e) => {
                    if self.failing.insert(*inode, Instant::now()).is_none() {
                        warn!("cannot hold a sentinel port in netns {name}: {e}; refused binds there get EPERM until it can (tried again every {} s)", RETRY.as_secs());
                    }
                }
            }
        }
        if changed || self.first {
            self.first = false;
            self.store();
            self.prune();
            self.mark(maps);
        }
        self.ports() != ports_before
    }

    fn in_range(&self, port: u16) -> bool {
        self.reserved.iter().any(|r| r.contains(port))
    }

    /// The ports sentinels hold or may hold: the configured one and those held in its place.
    pub(super) fn ports(&self) -> std::collections::BTreeSet<u16> {
        let mut ports: std::collections::BTreeSet<u16> =
            self.held.values().map(|h| h.port).collect();
        ports.insert(self.port);
        ports
    }

    /// Marks exactly [`Sentinels::ports`] as sentinel ports in `PG_PORTS`.
    fn mark(&mut self, maps: &mut crate::maps::Maps) {
        let wanted = self.ports();
        let marked = match self.marked.take() {
            Some(m) => m,
            None => match maps.sentinel_ports() {
                Ok(m) => m,
                Err(e) => {
                    warn!("reading the sentinel ports marked in the port map: {e}");
                    return;
                }
            },
        };
        match maps.mark_sentinel_ports(&marked, &wanted) {
            Ok(()) => self.marked = Some(wanted),
            Err(e) => warn!("marking the sentinel ports in the port map: {e}"),
        }
    }

    /// The sockets of one netns: inherited ones if the service manager kept them, else new
    /// ones, registered before they bind; then the netns is announced.
    fn hold(
        &mut self,
        name: &str,
        inode: u64,
        cookie: u64,
        path: Option<&PathBuf>,
        maps: &mut crate::maps::Maps,
    ) -> anyhow::Result<Held> {
        let (socks, stored, port) = match self.inherited.remove(&inode) {
            Some((port, socks)) if socks.len() == 2 => (socks, true, port),
            _ => {
                let (socks, port) = self.bind_first_free(cookie, inode, path)?;
                (socks, false, port)
            }
        };
        for s in &socks {
            self.sockets.insert(s.cookie, cookie, 0)?;
        }
        // Marked before it is announced: from the instant the programs rewrite refusals to it,
        // no one else may bind it in this netns.
        if port != self.port {
            let mut wanted = self.ports();
            wanted.insert(port);
            let marked = self.marked.clone().unwrap_or_default();
            maps.mark_sentinel_ports(&marked, &wanted)?;
            self.marked = Some(wanted);
        }
        self.netns.insert(cookie, u32::from(port), 0)?;
        Ok(Held {
            name: name.to_owned(),
            netns_cookie: cookie,
            port,
            socks,
            stored,
        })
    }

    /// New sentinel sockets in the netns (here, or at `path`), registered under `cookie` and
    /// bound to the configured port, or where another socket holds it, to the nearest free port
    /// below it that no range covers (at most [`FALLBACK_TRIES`] tried). Returns them and the
    /// port.
    fn bind_first_free(
        &mut self,
        cookie: u64,
        inode: u64,
        path: Option<&PathBuf>,
    ) -> anyhow::Result<(Vec<SentinelSocket>, u16)> {
        let ns = match path {
            None => None,
            Some(p) => {
                let Some(ns) = Netns::open(p)? else {
                    anyhow::bail!("{} is gone", p.display());
                };
                if ns.inode != inode {
                    anyhow::bail!("{} names another netns now", p.display());
                }
                Some(ns)
            }
        };
        let candidates: Vec<u16> = std::iter::once(self.port)
            .chain(
                (1024..self.port)
                    .rev()
                    .filter(|p| !self.in_range(*p))
                    .take(usize::from(FALLBACK_TRIES)),
            )
            .collect();
        for port in candidates {
            // Fresh sockets for each try: one bound half way cannot bind again.
            let socks = match &ns {
                None => sentinel::create()?,
                Some(ns) => ns.run(sentinel::create)??,
            };
            for s in &socks {
                self.sockets.insert(s.cookie, cookie, 0)?;
            }
            let bound = match &ns {
                None => sentinel::bind(&socks, port),
                Some(ns) => ns.run(|| sentinel::bind(&socks, port)).and_then(|r| r),
            };
            match bound {
                Ok(()) => return Ok((socks, port)),
                Err(e) => {
                    for s in &socks {
                        let _ = self.sockets.remove(&s.cookie);
                    }
                    if e.raw_os_error() != Some(libc::EADDRINUSE) {
                        return Err(e.into());
                    }
                }
            }
        }
        anyhow::bail!(
            "other sockets hold port {} and the {FALLBACK_TRIES} ports below it outside the ranges",
            self.port
        )
    }

    /// Stops announcing a netns, then closes its sockets.
    fn release(&mut self, inode: u64, h: &Held) {
        let _ = self.netns.remove(&h.netns_cookie);
        for s in &h.socks {
            let _ = self.sockets.remove(&s.cookie);
        }
        if h.stored {
            crate::notify::notify(&format!("FDSTOREREMOVE=1\nFDNAME={FDNAME_PREFIX}{inode}"));
        }
    }

    /// Hands the sockets not yet stored to the service manager's fd store.
    fn store(&mut self) {
        for (inode, h) in self.held.iter_mut().filter(|(_, h)| !h.stored) {
            let fds: Vec<_> = h.socks.iter().map(|s| s.socket.as_fd()).collect();
            h.stored = crate::notify::notify_with_fds(
                &format!("FDSTORE=1\nFDNAME={FDNAME_PREFIX}{inode}"),
                &fds,
            );
        }
    }

    /// Map entries no held sentinel accounts for (a previous daemon's): removed.
    fn prune(&mut self) {
        let ours: Vec<u64> = self
            .held
            .values()
            .flat_map(|h| h.socks.iter().map(|s| s.cookie))
            .collect();
        let stale: Vec<u64> = self
            .sockets
            .keys()
            .flatten()
            .filter(|c| !ours.contains(c))
            .collect();
        for c in stale {
            let _ = self.sockets.remove(&c);
        }
        let announced: Vec<u64> = self.held.values().map(|h| h.netns_cookie).collect();
        let stale: Vec<u64> = self
            .netns
            .keys()
            .flatten()
            .filter(|c| !announced.contains(c))
            .collect();
        for c in stale {
            let _ = self.netns.remove(&c);
        }
    }

    /// Where the sentinel holds the port, by name, for the log.
    /// `49151 (held in: host, blue)`, or with a port taken in place of the configured one
    /// `49151 (held in: host on port 49150, blue)`.
    pub(super) fn describe(&self) -> String {
        if self.held.is_empty() {
            return format!("{} (held nowhere yet)", self.port);
        }
        let places: Vec<String> = self
            .held
            .values()
            .map(|h| {
                if h.port == self.port {
                    h.name.clone()
                } else {
                    format!("{} on port {}", h.name, h.port)
                }
            })
            .collect();
        format!("{} (held in: {})", self.port, places.join(", "))
    }

    /// The daemon stops. With an fd store the sockets outlive it and stay announced; without
    /// one they close with it, so the netns stop being announced first: refused binds then get
    /// EPERM, and their log lines say so.
    pub(super) fn stop(&mut self) {
        if self.fd_store || self.held.is_empty() {
            return;
        }
        for h in self.held.values() {
            let _ = self.netns.remove(&h.netns_cookie);
        }
        if self.held.values().all(|h| h.stored) {
            // systemd before 254 takes FDSTORE=1 without saying whether it keeps the fds.
            info!(
                "the sentinel sockets were handed to the service manager: they outlive this daemon if the unit has FileDescriptorStoreMax=; if not, refused binds get EPERM (none succeeds) until the next daemon holds a sentinel port again"
            );
        } else {
            warn!(
                "no service manager fd store keeps the sentinel sockets: they close with this daemon, and refused binds get EPERM (none succeeds) until the next daemon holds a sentinel port again (under systemd, FileDescriptorStoreMax= in the unit keeps them)"
            );
        }
    }
}
