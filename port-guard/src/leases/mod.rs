//! Leases: a port claimed for one cgroup, enforced by the kernel from the instant it exists.
//!
//! [`LeaseTable`] owns the two places a lease lives: the kernel map `PG_LEASES` (the authority:
//! the programs read it) and the allocators' shared bitmap (`PG_ALLOC`, a hint that lets an
//! allocator find the lowest unleased port without reading the map). Its methods are the only
//! way to add or end a lease, so the order that keeps the two consistent lives here alone: a
//! claim inserts the lease and then marks the bit; a release deletes the lease and then clears
//! the bit; either bumps the generation counter last, which tells the daemon's reaper to read
//! the map again. [`alloc`] finds and probes a free port with it.

mod alloc;
mod bitmap;
pub mod migrate;

use std::{collections::BTreeMap, io, os::fd::AsFd as _};

use aya::maps::{HashMap, MapData, MapError};
use port_guard_common::{
    Lease, ALLOC_ENDED_EMPTIED, ALLOC_ENDED_EXPIRED, ALLOC_ENDED_RELEASED, ALLOC_ENDED_REMOVED,
    LEASE_UNTIL_EMPTY, MAP_LEASES,
};

pub use self::alloc::{allocate, allocate_many, probe_free};
use self::bitmap::AllocMap;
use crate::sys;

const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// A lease could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Every port of every range is leased or held.
    #[error("no free port: every port of {ranges} is leased or already bound")]
    Exhausted { ranges: String },
    /// Fewer free ports than asked for (none of them stays claimed).
    #[error("{wanted} ports asked for, only {found} free in {ranges} (none was leased)")]
    TooFew {
        wanted: usize,
        found: usize,
        ranges: String,
    },
    /// A lease held by another cgroup than the one named.
    #[error("port {port} is leased to {holder}, not to {cgroup}")]
    NotTheirs {
        port: u16,
        holder: String,
        cgroup: String,
    },
    /// A requested port outside every reserved range.
    #[error("port {port} is not in a reserved range ({ranges})")]
    NotReserved { port: u16, ranges: String },
    /// A requested port that is leased already.
    #[error("port {port} is already leased to {holder}")]
    Leased { port: u16, holder: String },
    /// A requested port that a socket holds.
    #[error("port {port} is already bound by another socket")]
    InUse { port: u16 },
    /// No lease on that port.
    #[error("port {0} is not leased")]
    NotLeased(u16),
    /// The probe bind failed for another reason than EADDRINUSE.
    #[error("probing port {port}")]
    Probe {
        port: u16,
        #[source]
        source: io::Error,
    },
    /// The lease map refused an operation.
    #[error("map {MAP_LEASES}")]
    Map(#[source] Box<MapError>),
}

impl LeaseError {
    pub fn is_usage(&self) -> bool {
        matches!(self, LeaseError::NotReserved { .. })
    }
}

/// Who holds a lease and how long it lasts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    pub cgroup_id: u64,
    pub level: u32,
    /// [`LEASE_UNTIL_EMPTY`] or 0.
    pub flags: u32,
    /// CLOCK_BOOTTIME seconds, 0: no TTL.
    pub expires: u64,
    /// The lessee's CPU time now ([`Lease::cpu_usec`]), u64::MAX: unknown.
    pub cpu_usec: u64,
}

impl Holder {
    /// A lease that lasts until released or its cgroup is removed.
    pub fn plain(cgroup_id: u64, level: u32) -> Holder {
        Holder {
            cgroup_id,
            level,
            flags: 0,
            expires: 0,
            cpu_usec: u64::MAX,
        }
    }

    /// A `spawn` lease: it also ends when its cgroup empties.
    pub fn until_empty(cgroup_id: u64, level: u32) -> Holder {
        Holder {
            flags: LEASE_UNTIL_EMPTY,
            ..Holder::plain(cgroup_id, level)
        }
    }

    fn lease(self) -> Lease {
        Lease {
            cgroup_id: self.cgroup_id,
            level: self.level,
            flags: self.flags,
            since: now_secs(),
            expires: self.expires,
            cpu_usec: self.cpu_usec,
        }
    }
}

/// How a lease ended, for the log and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// `port-guard release`.
    Released,
    /// Its cgroup was removed.
    Removed,
    /// Its cgroup had no process left (spawn leases, `--until-empty`).
    Emptied,
    /// Its TTL ran out.
    Expired,
}

impl Ended {
    pub const ALL: [Ended; 4] = [
        Ended::Released,
        Ended::Removed,
        Ended::Emptied,
        Ended::Expired,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Ended::Released => "released",
            Ended::Removed => "cgroup_removed",
            Ended::Emptied => "emptied",
            Ended::Expired => "expired",
        }
    }

    fn word(self) -> usize {
        match self {
            Ended::Released => ALLOC_ENDED_RELEASED,
            Ended::Removed => ALLOC_ENDED_REMOVED,
            Ended::Emptied => ALLOC_ENDED_EMPTIED,
            Ended::Expired => ALLOC_ENDED_EXPIRED,
        }
    }
}

/// Whether `lease` ran out at `now` (CLOCK_BOOTTIME seconds).
pub fn expired(lease: &Lease, now: u64) -> bool {
    lease.expires != 0 && lease.expires <= now
}

fn map_err(e: MapError) -> LeaseError {
    LeaseError::Map(Box::new(e))
}

fn is_errno(e: &MapError, errno: i32) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno))
}

/// The lease map and the allocators' bitmap, kept in step.
pub struct LeaseTable {
    map: HashMap<MapData, u32, Lease>,
    bitmap: AllocMap,
}

impl LeaseTable {
    /// `map` is `PG_LEASES`, `alloc` the `PG_ALLOC` array (mapped here).
    pub(crate) fn new(map: HashMap<MapData, u32, Lease>, alloc: MapData) -> io::Result<LeaseTable> {
        Ok(LeaseTable {
            map,
            bitmap: AllocMap::new(alloc)?,
        })
    }

    /// `n` charges removed from `PG_CHARGES` by the agent (see [`AllocMap::uncount_charges`]).
    pub(crate) fn uncount_charges(&self, n: u64) {
        self.bitmap.uncount_charges(n);
    }

    /// The lease on `port`, if any.
    pub fn get(&self, port: u16) -> Result<Option<Lease>, LeaseError> {
        match self.map.get(&u32::from(port), 0) {
            Ok(l) => Ok(Some(l)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Every lease by port (a few syscalls whatever their number).
    pub fn all(&self) -> Result<BTreeMap<u16, Lease>, LeaseError> {
        use aya::maps::IterableMap as _;
        let fd = self.map.map().fd().as_fd();
        // 2,048 a call: the value buffer (80 KiB) stays below glibc's 128 KiB mmap threshold, so
        // the reaper's reads (one per lease change) reuse heap memory instead of mapping and
        // unmapping, and moving the threshold, every time.
        let entries = sys::read_all::<u32, Lease>(fd, 2048).map_err(|io_error| {
            map_err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error,
            }))
        })?;
        Ok(entries
            .into_iter()
            .map(|(port, lease)| (port as u16, lease))
            .collect())
    }

    /// Claims `port` for `holder` if nobody holds a lease on it: the kernel decides races
    /// between allocators (BPF_NOEXIST). True when this call made the lease.
    pub fn claim(&mut self, port: u16, holder: Holder) -> Result<bool, LeaseError> {
        match self
            .map
            .insert(u32::from(port), holder.lease(), BPF_NOEXIST)
        {
            Ok(()) => {
                self.bitmap.mark(port);
                self.bitmap.bump();
                Ok(true)
            }
            Err(e) if is_errno(&e, libc::EEXIST) => {
                // Leased already; the bitmap may not know yet (a lease of an allocator that died
                // between its claim and its mark).
                self.bitmap.mark(port);
                Ok(false)
            }
            Err(e) => Err(map_err(e)),
        }
    }

    /// Inserts a lease carried over from an older layout, unless the port has one: true when
    /// it was inserted.
    pub(crate) fn insert_migrated(&mut self, port: u16, lease: Lease) -> Result<bool, LeaseError> {
        match self.map.insert(u32::from(port), lease, BPF_NOEXIST) {
            Ok(()) => {
                self.bitmap.mark(port);
                self.bitmap.bump();
                Ok(true)
            }
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(false),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Gives an existing lease to another holder in one map update: the port is never unleased.
    pub fn hand_over(&mut self, port: u16, holder: Holder) -> Result<(), LeaseError> {
        self.replace(port, holder.lease())
    }

    /// Overwrites `port`'s existing lease in one map update (BPF_EXIST: never creates one), and
    /// tells the reaper.
    fn replace(&mut self, port: u16, lease: Lease) -> Result<(), LeaseError> {
        self.map
            .insert(u32::from(port), lease, BPF_EXIST)
            .map_err(|e| {
                if is_errno(&e, libc::ENOENT) {
                    LeaseError::NotLeased(port)
                } else {
                    map_err(e)
                }
            })?;
        self.bitmap.bump();
        Ok(())
    }

    /// Removes the lease on `port`. The lease goes before its bit: an allocator that sees the bit
    /// clear finds the port unleased.
    pub fn release(&mut self, port: u16) -> Result<(), LeaseError> {
        let result = self.map.remove(&u32::from(port)).map_err(|e| {
            if is_errno(&e, libc::ENOENT) {
                LeaseError::NotLeased(port)
            } else {
                map_err(e)
            }
        });
        if matches!(result, Ok(()) | Err(LeaseError::NotLeased(_))) {
            self.bitmap.unmark(port);
            self.bitmap.bump();
        }
        result
    }

    /// Sets the expiry of `port`'s lease, which must be `cgroup_id`'s (`expires`: CLOCK_BOOTTIME
    /// seconds, 0: none), in one map update that keeps the rest of it. `name` names cgroups by
    /// id for the error.
    pub fn renew(
        &mut self,
        port: u16,
        cgroup_id: u64,
        expires: u64,
        mut name: impl FnMut(u64) -> String,
    ) -> Result<Lease, LeaseError> {
        let Some(mut lease) = self.get(port)? else {
            return Err(LeaseError::NotLeased(port));
        };
        if lease.cgroup_id != cgroup_id {
            return Err(LeaseError::NotTheirs {
                port,
                holder: name(lease.cgroup_id),
                cgroup: name(cgroup_id),
            });
        }
        lease.expires = expires;
        self.replace(port, lease)?;
        Ok(lease)
    }

    /// Counts a lease that ended (`release` counts itself).
    pub fn count_end(&self, how: Ended) {
        self.bitmap.add(how.word(), 1);
    }

    /// Leases ended so far, by how ([`Ended::ALL`] order), since the guard was first loaded.
    pub fn ended(&self) -> [u64; 4] {
        Ended::ALL.map(|e| self.bitmap.read(e.word()))
    }

    /// Removes the lease on `port` if it is still `cgroup_id`'s (it may have changed hands since
    /// it was read). True when it ended here.
    pub fn release_if_held_by(&mut self, port: u16, cgroup_id: u64) -> Result<bool, LeaseError> {
        match self.get(port)? {
            Some(now) if now.cgroup_id == cgroup_id => match self.release(port) {
                Ok(()) | Err(LeaseError::NotLeased(_)) => Ok(true),
                Err(e) => Err(e),
            },
            _ => Ok(false),
        }
    }

    /// Removes every lease of `cgroup_id`; returns the ports.
    pub fn release_cgroup(&mut self, cgroup_id: u64) -> Result<Vec<u16>, LeaseError> {
        let mut ports = Vec::new();
        for (port, lease) in self.all()? {
            if lease.cgroup_id == cgroup_id && self.release_if_held_by(port, cgroup_id)? {
                ports.push(port);
            }
        }
        Ok(ports)
    }

    /// Changes whenever a lease is claimed, handed over or released.
    pub fn generation(&self) -> u64 {
        self.bitmap.generation()
    }

    /// The lowest port in `from..=last` the bitmap shows unleased (a candidate: the claim decides).
    pub fn first_unmarked(&self, from: u16, last: u16) -> Option<u16> {
        self.bitmap.first_unmarked(from, last)
    }

    /// Makes the bitmap say what the lease map says (`leases`: a snapshot of it). Returns
    /// (stale marks cleared, marks added).
    pub fn reconcile(&self, leases: &BTreeMap<u16, Lease>) -> (u64, u64) {
        self.bitmap.reconcile(leases.keys().copied(), |port| {
            // A mark the snapshot does not explain is cleared only if the lease map still has
            // no lease: the port may have been claimed since. An error keeps the mark.
            !matches!(self.get(port), Ok(None))
        })
    }

    /// Counts one request that leased `ports` ports, or (0) one refused for want of free
    /// ports, for the metrics.
    pub fn record(&self, ports: u64) {
        self.bitmap.record(ports);
    }

    /// What the allocators counted since the guard was first loaded.
    pub fn totals(&self) -> bitmap::Totals {
        self.bitmap.totals()
    }
}

/// CLOCK_BOOTTIME in seconds: the time base of lease expiries.
pub fn now_boot_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether `path` is a cgroup `spawn` made (directly below the spawn parent).
pub fn is_spawned(
    path: &crate::cgroup::CgroupPath,
    spawn_parent: &crate::cgroup::CgroupPath,
) -> bool {
    path.is_within(spawn_parent) && path.level() == spawn_parent.level() + 1
}
