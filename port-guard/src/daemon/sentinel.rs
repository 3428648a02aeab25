//! The daemon's sentinels ([`crate::sentinel`]): one per guarded netns it can reach, registered
//! in `PG_SENTINELS` before it binds, announced in `PG_SENT_NETNS` once it holds the port, and
//! handed to the service manager's fd store so that a restart keeps them.

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

/// How often a netns whose sentinel port was taken is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// A netns the sentinel should be in: (name, inode, cookie, path to enter it; None: here).
pub(super) type Target = (String, u64, u64, Option<PathBuf>);

struct Held {
    name: String,
    netns_cookie: u64,
    socks: Vec<SentinelSocket>,
    /// Handed to the fd store (or came from it).
    stored: bool,
}

pub(super) struct Sentinels {
    pub(super) port: u16,
    held: BTreeMap<u64, Held>,
    /// Inherited from the fd store, not yet matched to a netns: by netns inode.
    inherited: BTreeMap<u64, Vec<SentinelSocket>>,
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
        let mut inherited: BTreeMap<u64, Vec<SentinelSocket>> = BTreeMap::new();
        for (name, fd) in fds {
            if !name.starts_with(FDNAME_PREFIX) {
                continue;
            }
            match sentinel::adopt(fd, port) {
                Some(s) => inherited.entry(s.netns_inode).or_default().push(s),
                None => warn!("an fd named {name} from the service manager is not a sentinel socket on port {port}: closed"),
            }
        }
        let adopted: usize = inherited.values().map(Vec::len).sum();
        if adopted > 0 {
            info!("took over {adopted} sentinel sockets from the service manager (its fd store)");
        }
        Ok(Sentinels {
            port,
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

    /// Holds the port in every target netns, lets go of it elsewhere, and makes the maps say
    /// exactly that. A netns whose port another socket holds is tried again every few seconds.
    pub(super) fn sync(&mut self, targets: &[Target]) {
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
                    self.port, h.name
                );
            }
        }
        for (name, inode, cookie, path) in targets {
            if self
                .held
                .get(inode)
                .is_some_and(|h| h.netns_cookie == *cookie)
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
            match self.hold(name, *inode, *cookie, path.as_ref()) {
                Ok(h) => {
                    if self.failing.remove(inode).is_some() {
                        info!("sentinel port {} in netns {name} is held again: refused binds there get EADDRINUSE", self.port);
                    }
                    self.held.insert(*inode, h);
                }
                Err(e) => {
                    if self.failing.insert(*inode, Instant::now()).is_none() {
                        warn!("cannot hold the sentinel port {} in netns {name}: {e}; refused binds there get EPERM until it can (tried again every {} s)", self.port, RETRY.as_secs());
                    }
                }
            }
        }
        if changed || self.first {
            self.first = false;
            self.store();
            self.prune();
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
    ) -> anyhow::Result<Held> {
        let (socks, stored) = match self.inherited.remove(&inode) {
            Some(socks) if socks.len() == 2 => (socks, true),
            _ => {
                let socks = match path {
                    None => sentinel::create()?,
                    Some(p) => {
                        let Some(ns) = Netns::open(p)? else {
                            anyhow::bail!("{} is gone", p.display());
                        };
                        if ns.inode != inode {
                            anyhow::bail!("{} names another netns now", p.display());
                        }
                        ns.run(sentinel::create)??
                    }
                };
                for s in &socks {
                    self.sockets.insert(s.cookie, cookie, 0)?;
                }
                if let Err(e) = sentinel::bind(&socks, self.port) {
                    for s in &socks {
                        let _ = self.sockets.remove(&s.cookie);
                    }
                    return Err(if e.raw_os_error() == Some(libc::EADDRINUSE) {
                        anyhow::anyhow!("another socket holds it")
                    } else {
                        e.into()
                    });
                }
                (socks, false)
            }
        };
        for s in &socks {
            self.sockets.insert(s.cookie, cookie, 0)?;
        }
        self.netns.insert(cookie, u32::from(self.port), 0)?;
        Ok(Held {
            name: name.to_owned(),
            netns_cookie: cookie,
            socks,
            stored,
        })
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

    /// Netns where the port is held, and where it is wanted but taken (for the metrics).
    pub(super) fn counts(&self) -> crate::metrics::SentinelCounts {
        crate::metrics::SentinelCounts {
            held: self.held.len() as u64,
            missing: self.failing.len() as u64,
        }
    }

    /// Where the sentinel holds the port, by name, for the log.
    pub(super) fn describe(&self) -> String {
        if self.held.is_empty() {
            return "nowhere yet".into();
        }
        self.held
            .values()
            .map(|h| h.name.clone())
            .collect::<Vec<_>>()
            .join(", ")
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
                "the sentinel sockets were handed to the service manager: they outlive this daemon if the unit has FileDescriptorStoreMax=; if not, refused binds get EPERM (none succeeds) until the next daemon holds port {} again",
                self.port
            );
        } else {
            warn!(
                "no service manager fd store keeps the sentinel sockets: they close with this daemon, and refused binds get EPERM (none succeeds) until the next daemon holds port {} again (under systemd, FileDescriptorStoreMax= in the unit keeps them)",
                self.port
            );
        }
    }
}
