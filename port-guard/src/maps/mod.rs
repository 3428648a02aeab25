//! The guard's maps, from a fresh load or from the pins, read and written through typed
//! accessors: the ranges come back as [`ReserveSpec`]s with their slot, the counters as
//! [`Counters`] per protocol, the config as [`Settings`]. The lease map is inside
//! [`LeaseTable`]; the policy is written by [`write`].

mod shares;
mod write;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::{
    maps::{Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray},
    Ebpf,
};
use port_guard_common::{
    CgroupDenials, GuardConfig, Offender, PortEntry, Proto, RangeDef, Slot, ABI_VERSION,
    COUNTER_ALLOWED, COUNTER_AUDITED, COUNTER_DENIED, EVENTS_LOST_INDEX, FLAG_NETNS_SCOPED,
    FLAG_PROTECT_EPHEMERAL, FLAG_RETVAL, FLAG_SENTINEL, MAP_ALLOC, MAP_ALLOWED, MAP_BUDGET,
    MAP_CGROUP_DENIALS, MAP_CONFIG, MAP_COUNTERS, MAP_LEASES, MAP_NETNS, MAP_PORTS, MAP_RANGES,
    MAP_SENTINELS, MAP_SENTINEL_NETNS, MAP_STATS, MAP_UNGUARDED, MAX_RANGES, MODE_AUDIT, PROTO_TCP,
    PROTO_UDP, REASON_LIMIT, SLOT_SENTINEL, STAT_BUDGET_NEW, STAT_CGROUP_NEW,
};

pub use self::{
    shares::{by_slot, Share},
    write::Resolved,
};
use crate::{
    error::IoError,
    leases::{LeaseError, LeaseTable},
    pin::{PinDir, PinError},
    policy::{Errno, Mode, PolicyError, PortRange, Protocols, ReserveSpec},
    shared::SharedWords,
};

/// A problem with the guard's maps.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The pins were written by a binary with another map layout.
    #[error("the guard pinned at {dir} uses map layout {found}, this binary uses {ours}; `port-guard unload --pin-dir {dir}` removes it (its leases are lost)")]
    Abi {
        dir: std::path::PathBuf,
        found: u32,
        ours: u32,
    },
    /// A map could not be opened or used.
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    /// The pin dir cannot be used.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// The policy does not fit the maps.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A lease map problem.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// A filesystem or syscall failure.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl MapsError {
    pub fn is_usage(&self) -> bool {
        match self {
            MapsError::Policy(_) => true,
            MapsError::Pin(e) => e.is_usage(),
            _ => false,
        }
    }
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |e| MapsError::Map {
        name,
        source: Box::new(e),
    }
}

/// A raw syscall (`call`) on map `name` failed.
fn syscall_err(name: &'static str, call: &'static str) -> impl FnOnce(io::Error) -> MapsError {
    move |io_error| {
        map_err(name)(MapError::SyscallError(aya::sys::SyscallError {
            call,
            io_error,
        }))
    }
}

/// The range slot `index` of a map read by slot: one past the last is the map's out-of-bounds
/// error (every slot the maps hand out is one).
fn checked_slot(name: &'static str, index: u32) -> Result<Slot, MapsError> {
    Slot::new(index).ok_or_else(|| {
        map_err(name)(MapError::OutOfBounds {
            index,
            max_entries: MAX_RANGES as u32,
        })
    })
}

/// Allowed, denied and audited binds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    /// Of the denied (or audited) ones, those refused because the binding unit held its
    /// per-child limit.
    pub limited: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.allowed += o.allowed;
        self.denied += o.denied;
        self.audited += o.audited;
        self.limited += o.limited;
    }
}

/// A range's counters by protocol.
#[derive(Debug, Default, Clone, Copy)]
pub struct RangeCounters {
    pub tcp: Counters,
    pub udp: Counters,
}

impl RangeCounters {
    /// The counters of `proto`.
    pub fn of(&self, proto: Proto) -> Counters {
        match proto {
            Proto::Tcp => self.tcp,
            Proto::Udp => self.udp,
        }
    }

    pub fn total(&self) -> Counters {
        let mut t = self.tcp;
        t += self.udp;
        t
    }

    /// The counters of each protocol the range covers, with its name.
    pub fn by_protocol(&self, protocols: Protocols) -> Vec<(&'static str, Counters)> {
        Proto::ALL
            .into_iter()
            .filter(|p| p.in_set(protocols.0))
            .map(|p| (p.name(), self.of(p)))
            .collect()
    }
}

/// A configured range and the slot that holds it (its allowed-cgroup bit and its counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRange {
    pub slot: u32,
    pub spec: ReserveSpec,
}

impl SlotRange {
    /// The range's bit in an allowed cgroup's mask (none for a slot out of bounds).
    pub fn bit(&self) -> u64 {
        Slot::new(self.slot).map_or(0, Slot::bit)
    }
}

/// The config entry, decoded.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub mode: Mode,
    pub errno: Errno,
    /// Whether the kernel gives refused binds the configured errno (else EPERM).
    pub retval: bool,
    pub protect_ephemeral: bool,
    /// Enforcing only in the namespaces of [`Maps::guarded_netns`] (else in every netns).
    pub netns_scoped: bool,
    /// Refusals with EADDRINUSE go through the sentinel port (where a sentinel holds it).
    pub sentinel: bool,
    pub attach_id: u64,
    pub spawn_parent_id: u64,
}

impl Settings {
    /// What refused binds get on this kernel.
    pub fn effective_errno(&self) -> Errno {
        if self.retval || (self.sentinel && self.errno == Errno::Eaddrinuse) {
            self.errno
        } else {
            Errno::Eperm
        }
    }
}

/// The guard's maps.
pub struct Maps {
    ports: Array<MapData, PortEntry>,
    ranges: Array<MapData, RangeDef>,
    /// PG_RANGES mapped (it is `BPF_F_MMAPABLE`): reading the ranges costs no syscall, which
    /// is most of what an allocation costs beyond its probe.
    ranges_view: SharedWords,
    allowed: HashMap<MapData, u64, u64>,
    config: Array<MapData, GuardConfig>,
    counters: PerCpuArray<MapData, u64>,
    leases: LeaseTable,
    /// PG_NETNS and PG_UNGUARDED: None in pins of a daemon from before they existed.
    netns: Option<HashMap<MapData, u64, u64>>,
    unguarded: Option<PerCpuArray<MapData, u64>>,
    /// The per-child shares (PG_LIMITS, PG_SHARES, PG_CHARGES, PG_REASONS): None in pins of a
    /// daemon from before they existed.
    shares: Option<shares::ShareMaps>,
    /// PG_STATS: None in pins of a daemon from before it existed.
    stats: Option<PerCpuArray<MapData, u64>>,
    /// PG_BUDGET and PG_CG_DENIALS (the event budget), PG_SENT_NETNS (where sentinels hold
    /// their port): read here for the metrics; None in pins of an older daemon.
    budget: Option<HashMap<MapData, u64, Offender>>,
    cgroup_denials: Option<HashMap<MapData, u64, CgroupDenials>>,
    sentinel_netns: Option<HashMap<MapData, u64, u32>>,
    sentinels: Option<HashMap<MapData, u64, u64>>,
}

/// The map data of the kinds the guard uses.
fn map_data(m: &Map) -> Option<&MapData> {
    match m {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::RingBuf(d) => Some(d),
        _ => None,
    }
}

fn open_pinned(pin: &PinDir, name: &'static str) -> Result<Map, MapsError> {
    let data = MapData::from_pin(pin.file(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

impl Maps {
    fn build(
        mut get: impl FnMut(&'static str) -> Result<Map, MapsError>,
        mut optional: impl FnMut(&'static str) -> Option<Map>,
    ) -> Result<Maps, MapsError> {
        let ranges: Array<MapData, RangeDef> =
            get(MAP_RANGES)?.try_into().map_err(map_err(MAP_RANGES))?;
        let ranges_view = SharedWords::map(
            IterableMap::map(&ranges).fd().as_fd().as_raw_fd(),
            MAX_RANGES,
        )
        .map_err(syscall_err(MAP_RANGES, "mmap"))?;
        let alloc = match get(MAP_ALLOC)? {
            Map::Array(data) => data,
            _ => {
                return Err(map_err(MAP_ALLOC)(MapError::InvalidName {
                    name: MAP_ALLOC.into(),
                }))
            }
        };
        let leases = LeaseTable::new(
            get(MAP_LEASES)?.try_into().map_err(map_err(MAP_LEASES))?,
            alloc,
        )
        .map_err(syscall_err(MAP_ALLOC, "mmap"))?;
        Ok(Maps {
            ports: get(MAP_PORTS)?.try_into().map_err(map_err(MAP_PORTS))?,
            ranges,
            ranges_view,
            allowed: get(MAP_ALLOWED)?.try_into().map_err(map_err(MAP_ALLOWED))?,
            config: get(MAP_CONFIG)?.try_into().map_err(map_err(MAP_CONFIG))?,
            counters: get(MAP_COUNTERS)?
                .try_into()
                .map_err(map_err(MAP_COUNTERS))?,
            leases,
            netns: optional(MAP_NETNS)
                .map(|m| m.try_into().map_err(map_err(MAP_NETNS)))
                .transpose()?,
            unguarded: optional(MAP_UNGUARDED)
                .map(|m| m.try_into().map_err(map_err(MAP_UNGUARDED)))
                .transpose()?,
            shares: shares::ShareMaps::build(&mut optional)?,
            stats: optional(MAP_STATS)
                .map(|m| m.try_into().map_err(map_err(MAP_STATS)))
                .transpose()?,
            budget: optional(MAP_BUDGET).and_then(|m| m.try_into().ok()),
            cgroup_denials: optional(MAP_CGROUP_DENIALS).and_then(|m| m.try_into().ok()),
            sentinel_netns: optional(MAP_SENTINEL_NETNS).and_then(|m| m.try_into().ok()),
            sentinels: optional(MAP_SENTINELS).and_then(|m| m.try_into().ok()),
        })
    }

    /// The maps of a freshly loaded object, taken out of it; those other parts of the daemon
    /// take too (the event budget, the sentinels') are opened again by a duplicate of their fd.
    pub(crate) fn from_ebpf(ebpf: &mut Ebpf) -> Result<Maps, MapsError> {
        const SHARED: [&str; 4] = [
            MAP_BUDGET,
            MAP_CGROUP_DENIALS,
            MAP_SENTINELS,
            MAP_SENTINEL_NETNS,
        ];
        let mut get = |name: &'static str| -> Option<Result<Map, MapsError>> {
            if !SHARED.contains(&name) {
                return ebpf.take_map(name).map(Ok);
            }
            let fd = map_data(ebpf.map(name)?)?.fd().as_fd();
            Some(
                fd.try_clone_to_owned()
                    .map_err(syscall_err(name, "dup"))
                    .and_then(|fd| MapData::from_fd(fd).map_err(map_err(name)))
                    .and_then(|data| Map::from_map_data(data).map_err(map_err(name))),
            )
        };
        // Both closures of `build` take from one object.
        let get = std::cell::RefCell::new(&mut get);
        Maps::build(
            |name| {
                (get.borrow_mut())(name).unwrap_or_else(|| {
                    Err(map_err(name)(MapError::InvalidName { name: name.into() }))
                })
            },
            |name| (get.borrow_mut())(name).and_then(Result::ok),
        )
    }

    /// Opens the pinned maps, checking the pin dir and the layout version.
    pub fn open(pin: &PinDir) -> Result<Maps, MapsError> {
        pin.verify()?;
        // An unreadable pin dir (mode 0700, not root) is a permission error, not "not loaded".
        let config = pin.file(MAP_CONFIG);
        match fs::symlink_metadata(&config) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && !pin.exists() => {
                return Err(PinError::NotLoaded(pin.path().to_owned()).into());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(PinError::NeedsRoot(pin.path().to_owned()).into())
            }
            Err(e) => return Err(IoError::new("open pin", config, e).into()),
        }
        // The layout version first: pins of another layout may lack a map this one has.
        let config: Array<MapData, GuardConfig> = open_pinned(pin, MAP_CONFIG)?
            .try_into()
            .map_err(map_err(MAP_CONFIG))?;
        Maps::check_abi(&config, pin.path())?;
        Maps::build(
            |name| open_pinned(pin, name),
            |name| open_pinned(pin, name).ok(),
        )
    }

    pub(crate) fn check_abi(
        config: &Array<MapData, GuardConfig>,
        dir: &Path,
    ) -> Result<(), MapsError> {
        let c = config.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
        // 0: created by an interrupted first load that never wrote its config.
        if c.abi != ABI_VERSION && c.abi != 0 {
            return Err(MapsError::Abi {
                dir: dir.to_owned(),
                found: c.abi,
                ours: ABI_VERSION,
            });
        }
        Ok(())
    }

    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    pub fn leases_mut(&mut self) -> &mut LeaseTable {
        &mut self.leases
    }

    fn raw_config(&self) -> Result<GuardConfig, MapsError> {
        self.config.get(&0, 0).map_err(map_err(MAP_CONFIG))
    }

    /// The config entry: mode, errno and what the daemon recorded.
    pub fn settings(&self) -> Result<Settings, MapsError> {
        let c = self.raw_config()?;
        Ok(Settings {
            mode: if c.mode == MODE_AUDIT {
                Mode::Audit
            } else {
                Mode::Enforce
            },
            errno: Errno::from_raw(c.errno).unwrap_or_default(),
            retval: c.flags & FLAG_RETVAL != 0,
            protect_ephemeral: c.flags & FLAG_PROTECT_EPHEMERAL != 0,
            netns_scoped: c.flags & FLAG_NETNS_SCOPED != 0,
            sentinel: c.flags & FLAG_SENTINEL != 0,
            attach_id: c.attach_cgroup_id,
            spawn_parent_id: c.spawn_parent_id,
        })
    }

    /// The configured ranges with their slots, in port order, read from the mapping.
    pub fn ranges(&self) -> Vec<SlotRange> {
        const _: () = assert!(size_of::<RangeDef>() == 8);
        let mut v: Vec<SlotRange> = Slot::all()
            .zip(self.ranges_view.snapshot())
            .filter_map(|(slot, w)| {
                // SAFETY: RangeDef is 8 bytes of plain integers: any bits are a value.
                let r: RangeDef = unsafe { std::mem::transmute::<u64, RangeDef>(w) };
                (r.in_use != 0).then_some(SlotRange {
                    slot: slot.index(),
                    spec: ReserveSpec {
                        range: PortRange {
                            first: r.first,
                            last: r.last,
                        },
                        protocols: Protocols(r.protocols),
                    },
                })
            })
            .collect();
        v.sort_by_key(|r| r.spec.range);
        v
    }

    /// The configured ranges, in port order.
    pub fn reserved(&self) -> Vec<ReserveSpec> {
        self.ranges().into_iter().map(|r| r.spec).collect()
    }

    /// Allowed cgroup id → range mask (bit `slot`).
    pub fn allowed(&self) -> Result<StdHashMap<u64, u64>, MapsError> {
        self.allowed
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(MAP_ALLOWED))
    }

    /// The counters of range `slot`.
    pub fn counters(&self, slot: u32) -> Result<RangeCounters, MapsError> {
        let s = checked_slot(MAP_COUNTERS, slot)?;
        let read = |proto: Proto| -> Result<Counters, MapsError> {
            let mut cells = [0u64; 3];
            for (kind, cell) in [COUNTER_ALLOWED, COUNTER_DENIED, COUNTER_AUDITED]
                .into_iter()
                .zip(cells.iter_mut())
            {
                let values = self
                    .counters
                    .get(&s.counter(proto, kind), 0)
                    .map_err(map_err(MAP_COUNTERS))?;
                *cell = values.iter().sum();
            }
            Ok(Counters {
                allowed: cells[0],
                denied: cells[1],
                audited: cells[2],
                limited: 0,
            })
        };
        let mut c = RangeCounters {
            tcp: read(Proto::Tcp)?,
            udp: read(Proto::Udp)?,
        };
        c.tcp.limited = self.reasons(slot, Proto::Tcp)?[REASON_LIMIT as usize];
        c.udp.limited = self.reasons(slot, Proto::Udp)?[REASON_LIMIT as usize];
        Ok(c)
    }

    /// A per-CPU counter summed, by index.
    fn counter(&self, index: u32) -> Result<u64, MapsError> {
        Ok(self
            .counters
            .get(&index, 0)
            .map_err(map_err(MAP_COUNTERS))?
            .iter()
            .sum())
    }

    /// One of the programs' other counts (`STAT_*` of port_guard_common), summed over CPUs; 0
    /// in pins from before they were counted.
    pub fn stat(&self, index: u32) -> Result<u64, MapsError> {
        let Some(m) = &self.stats else { return Ok(0) };
        Ok(m.get(&index, 0).map_err(map_err(MAP_STATS))?.iter().sum())
    }

    /// What the event budget's LRU maps forgot to make room: (offenders, cgroups), each the keys
    /// the programs added minus those the map holds now.
    pub fn evicted(&self) -> Result<(u64, u64), MapsError> {
        let live = |fd: Option<std::os::fd::BorrowedFd<'_>>, value: usize| -> u64 {
            fd.and_then(|fd| crate::sys::lookup_batch(fd, 8, value, 4096).ok())
                .map_or(0, |(keys, _)| (keys.len() / 8) as u64)
        };
        let budget = live(
            self.budget
                .as_ref()
                .map(|m| IterableMap::map(m).fd().as_fd()),
            size_of::<Offender>(),
        );
        let cgroups = live(
            self.cgroup_denials
                .as_ref()
                .map(|m| IterableMap::map(m).fd().as_fd()),
            size_of::<CgroupDenials>(),
        );
        Ok((
            self.stat(STAT_BUDGET_NEW)?.saturating_sub(budget),
            self.stat(STAT_CGROUP_NEW)?.saturating_sub(cgroups),
        ))
    }

    /// The ports marked as sentinel ports in `PG_PORTS` (one batched read of the whole map).
    pub fn sentinel_ports(&self) -> Result<std::collections::BTreeSet<u16>, MapsError> {
        let fd = IterableMap::map(&self.ports).fd().as_fd();
        let all = crate::sys::read_all::<u32, PortEntry>(fd, 65536)
            .map_err(syscall_err(MAP_PORTS, "bpf_map_lookup_batch"))?;
        Ok(all
            .into_iter()
            .filter(|(_, e)| e.slot == SLOT_SENTINEL)
            .map(|(p, _)| p as u16)
            .collect())
    }

    /// Marks `wanted` as sentinel ports, and unmarks the rest of `marked`: new marks first.
    /// A port a range covers is never touched here.
    pub fn mark_sentinel_ports(
        &mut self,
        marked: &std::collections::BTreeSet<u16>,
        wanted: &std::collections::BTreeSet<u16>,
    ) -> Result<(), MapsError> {
        let ranges = self.ranges();
        let covered = |p: u16| ranges.iter().any(|r| r.spec.range.contains(p));
        let entry = PortEntry {
            slot: SLOT_SENTINEL,
            protocols: PROTO_TCP | PROTO_UDP,
        };
        for &p in wanted.iter().filter(|p| !marked.contains(p)) {
            if !covered(p) {
                self.ports
                    .set(u32::from(p), entry, 0)
                    .map_err(map_err(MAP_PORTS))?;
            }
        }
        for &p in marked.iter().filter(|p| !wanted.contains(p)) {
            if !covered(p) {
                self.ports
                    .set(u32::from(p), PortEntry::default(), 0)
                    .map_err(map_err(MAP_PORTS))?;
            }
        }
        Ok(())
    }

    /// The cookies of the daemon's sentinel sockets (`PG_SENTINELS`).
    pub fn sentinel_cookies(&self) -> std::collections::HashSet<u64> {
        self.sentinels
            .as_ref()
            .map(|m| m.keys().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    /// The ports sentinels hold, netns by netns (`PG_SENT_NETNS`): cookie → port.
    pub fn sentinel_netns_ports_by_cookie(&self) -> BTreeMap<u64, u16> {
        self.sentinel_netns
            .as_ref()
            .map(|m| {
                m.iter()
                    .filter_map(Result::ok)
                    .map(|(c, p)| (c, p as u16))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The ports sentinels hold, in any netns.
    pub fn sentinel_netns_ports(&self) -> Result<Vec<u16>, MapsError> {
        let mut v: Vec<u16> = self
            .sentinel_netns_ports_by_cookie()
            .into_values()
            .collect();
        v.sort_unstable();
        v.dedup();
        Ok(v)
    }

    /// Guarded network namespaces with a sentinel holding its port, and without: (held,
    /// missing). With the guard in every netns, the host's alone is expected.
    pub fn sentinel_netns(&self) -> Result<(u64, u64), MapsError> {
        let held = self
            .sentinel_netns
            .as_ref()
            .map_or(0, |m| m.keys().filter_map(Result::ok).count() as u64);
        let wanted = if self.settings()?.netns_scoped {
            self.guarded_netns()?.len() as u64
        } else {
            1
        };
        Ok((held, wanted.saturating_sub(held)))
    }

    /// Denial events the ring buffer had no room for, since the guard was first loaded.
    pub fn events_lost(&self) -> Result<u64, MapsError> {
        self.counter(EVENTS_LOST_INDEX)
    }

    fn set_flag(&mut self, flag: u32, on: bool) -> Result<(), MapsError> {
        let mut c = self.raw_config()?;
        if on {
            c.flags |= flag;
        } else {
            c.flags &= !flag;
        }
        self.config.set(0, c, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Records in the config map whether ephemeral protection is in force.
    pub fn set_protect_ephemeral(&mut self, on: bool) -> Result<(), MapsError> {
        self.set_flag(FLAG_PROTECT_EPHEMERAL, on)
    }

    /// The guarded namespaces: cookie → inode.
    pub fn guarded_netns(&self) -> Result<BTreeMap<u64, u64>, MapsError> {
        match &self.netns {
            Some(m) => m
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(MAP_NETNS)),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Makes the guard enforce in the namespaces of `set` (cookie → inode), or, with `scoped`
    /// false, in every one. Entries go in before the scope narrows to them; stale ones leave
    /// after.
    pub fn write_netns(&mut self, set: &BTreeMap<u64, u64>, scoped: bool) -> Result<(), MapsError> {
        let old = self.guarded_netns()?;
        let Some(map) = self.netns.as_mut() else {
            return Ok(());
        };
        for (&cookie, &inode) in set {
            if old.get(&cookie) != Some(&inode) {
                map.insert(cookie, inode, 0).map_err(map_err(MAP_NETNS))?;
            }
        }
        self.set_flag(FLAG_NETNS_SCOPED, scoped)?;
        let map = self.netns.as_mut().expect("checked above");
        for cookie in old.keys().filter(|c| !set.contains_key(c)) {
            match map.remove(cookie) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_NETNS)(e)),
            }
        }
        Ok(())
    }

    /// Binds of reserved ports of range `slot` that passed because their netns is not guarded:
    /// (tcp, udp).
    pub fn unguarded(&self, slot: u32) -> Result<(u64, u64), MapsError> {
        let Some(m) = &self.unguarded else {
            return Ok((0, 0));
        };
        let s = checked_slot(MAP_UNGUARDED, slot)?;
        let read = |proto: Proto| -> Result<u64, MapsError> {
            Ok(m.get(&s.proto_index(proto), 0)
                .map_err(map_err(MAP_UNGUARDED))?
                .iter()
                .sum())
        };
        Ok((read(Proto::Tcp)?, read(Proto::Udp)?))
    }

    /// Leases a port of the configured ranges to `cgroup_id`, free in every netns of
    /// `probe_in`: see [`crate::leases::allocate`].
    pub fn allocate(
        &mut self,
        holder: crate::leases::Holder,
        requested: Option<u16>,
        probe_in: &crate::netns::ProbeIn,
    ) -> Result<u16, LeaseError> {
        let ranges = self.reserved();
        crate::leases::allocate(&ranges, &mut self.leases, holder, requested, probe_in)
    }

    /// [`crate::leases::allocate_many`] over the reserved ranges.
    pub fn allocate_many(
        &mut self,
        holder: crate::leases::Holder,
        count: usize,
        probe_in: &crate::netns::ProbeIn,
    ) -> Result<Vec<u16>, LeaseError> {
        let ranges = self.reserved();
        crate::leases::allocate_many(&ranges, &mut self.leases, holder, count, probe_in)
    }
}
