//! Loading, adopting, configuring and unloading the guard. The kernel is the state store: the maps
//! and the two cgroup links are pinned under the pin dir, and everything here works from them.
//!
//! Load and adopt are one path. The object is loaded with its maps pinned by name, so a pinned
//! map (leases included) is reused rather than created. The policy is written into the maps, then
//! new bind4/bind6 links are attached next to any old ones (multi-attach), pinned under a
//! temporary name and renamed over the old pins: the old link goes away only once the new one
//! enforces, so a restart never leaves an unguarded instant, and a new binary replaces the old
//! programs in place.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs::{self, File},
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    maps::{Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray},
    pin::PinError,
    programs::{
        links::{CgroupAttachMode, FdLink, LinkError},
        CgroupSockAddr, ProgramError,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use log::{debug, info, warn};
use port_guard_common::{
    counter_index, GuardConfig, Lease, PortEntry, RangeDef, ABI_VERSION, COUNTER_ALLOWED,
    COUNTER_AUDITED, COUNTER_DENIED, EVENTS_LOST_INDEX, FLAG_PROTECT_EPHEMERAL, FLAG_RETVAL,
    GLOBAL_USE_RETVAL, MAP_ALLOC, MAP_ALLOWED, MAP_CONFIG, MAP_COUNTERS, MAP_LEASES, MAP_PORTS,
    MAP_RANGES, MAX_ALLOWED, MAX_CGROUP_LEVEL, MAX_RANGES, MODE_AUDIT, MODE_ENFORCE, PROG_BIND4,
    PROG_BIND6,
};

use crate::{
    alloc::{AllocMap, SharedWords},
    cgroup::{Cgroup2, CgroupError, CgroupPath},
    policy::{Errno, Mode, Policy, PortRange, Protocols, ReserveSpec},
    probe::Features,
    sys,
};

/// The eBPF object, built from port-guard-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/port-guard"));

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/port-guard";
/// Pin names of the two links, under the pin dir.
pub const LINKS: [(&str, &str); 2] = [(PROG_BIND4, "link_bind4"), (PROG_BIND6, "link_bind6")];
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// A guard problem at run time (exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Nothing is pinned at the pin dir.
    #[error("no guard is loaded at {0} (nothing pinned there)")]
    NotLoaded(PathBuf),
    /// The pins were written by a binary with another map layout.
    #[error("the guard pinned at {dir} uses map layout {found}, this binary uses {ours}; `port-guard unload --pin-dir {dir}` removes it (its leases are lost)")]
    Abi { dir: PathBuf, found: u32, ours: u32 },
    /// Another daemon holds the pin dir.
    #[error("another port-guard daemon is running on {0}")]
    Busy(PathBuf),
    /// The pin dir is not on a bpf filesystem and cannot be put on one.
    #[error("pin dir {0} is not on a bpf filesystem; mount one (`mount -t bpf bpf {1}`) or choose a pin dir under /sys/fs/bpf")]
    NotBpffs(PathBuf, PathBuf),
    /// Loading the object failed.
    #[error("loading the eBPF object")]
    Load(#[source] Box<EbpfError>),
    /// A program could not be loaded or attached.
    #[error("{what} {program}")]
    Program {
        what: &'static str,
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// A link could not be made or pinned.
    #[error("{what} link of {program}")]
    Link {
        what: &'static str,
        program: &'static str,
        #[source]
        source: Box<LinkError>,
    },
    /// A link could not be pinned.
    #[error("pin link of {program}")]
    Pin {
        program: &'static str,
        #[source]
        source: Box<PinError>,
    },
    /// A pinned map could not be opened or used.
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    /// More allowed cgroups than the map holds.
    #[error("{count} allowed cgroups configured; at most {max} are supported")]
    TooManyAllowed { count: usize, max: u32 },
    /// A cgroup below the deepest level the program walks.
    #[error("cgroup {0} is deeper than level {MAX_CGROUP_LEVEL}, the deepest the guard checks")]
    TooDeep(CgroupPath),
    /// A cgroup problem.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Restoring the ephemeral port sysctl failed.
    #[error(transparent)]
    Ephemeral(#[from] crate::ephemeral::EphemeralError),
    /// A filesystem or syscall failure.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> GuardError + 'a {
    move |source| GuardError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> GuardError {
    move |e| GuardError::Map {
        name,
        source: Box::new(e),
    }
}

/// A raw syscall (`call`) on map `name` failed.
fn syscall_err(name: &'static str, call: &'static str) -> impl FnOnce(io::Error) -> GuardError {
    move |io_error| {
        map_err(name)(MapError::SyscallError(aya::sys::SyscallError {
            call,
            io_error,
        }))
    }
}

/// The pin directory.
#[derive(Clone, Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(path: impl Into<PathBuf>) -> PinDir {
        PinDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Whether both links are pinned: the guard is (or was last left) attached.
    pub fn has_links(&self) -> bool {
        LINKS.iter().all(|(_, l)| self.file(l).exists())
    }

    /// Completes what a daemon killed while pinning left: a `_new` link pin (attached, newer)
    /// replaces the final one, or takes its place when it is missing. Returns what it did.
    pub fn recover(&self) -> Vec<String> {
        let mut done = Vec::new();
        for (_, link_name) in LINKS {
            let staged = self.file(&format!("{link_name}_new"));
            if staged.exists() && fs::rename(&staged, self.file(link_name)).is_ok() {
                done.push(format!(
                    "{link_name}: took over the link an interrupted start had pinned"
                ));
            }
        }
        done
    }

    /// Whether anything of a guard is pinned here.
    pub fn exists(&self) -> bool {
        self.file(MAP_CONFIG).exists() || LINKS.iter().any(|(_, l)| self.file(l).exists())
    }

    /// Makes sure the pin dir is on bpffs (mounting /sys/fs/bpf when nothing is mounted there)
    /// and exists with mode 0700. Returns whether bpffs was mounted.
    pub fn prepare(&self) -> Result<bool, GuardError> {
        let mut mounted = false;
        let probe_at = nearest_existing(&self.0);
        if !is_bpffs(&probe_at)? {
            let default_root = Path::new("/sys/fs/bpf");
            if self.0.starts_with(default_root) && probe_at.starts_with(default_root) {
                mount_bpffs(default_root)?;
                mounted = true;
            } else {
                return Err(GuardError::NotBpffs(self.0.clone(), probe_at));
            }
        }
        if !self.0.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.0)
                .map_err(io_err("create pin dir", &self.0))?;
        }
        fs::set_permissions(&self.0, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod 0700", &self.0))?;
        Ok(mounted)
    }

    /// Takes an exclusive lock on the pin dir for the daemon's lifetime.
    pub fn lock(&self) -> Result<File, GuardError> {
        let dir = File::open(&self.0).map_err(io_err("open", &self.0))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(GuardError::Busy(self.0.clone()));
            }
            return Err(io_err("lock", &self.0)(e));
        }
        Ok(dir)
    }
}

/// Whether the pin dir is (or would be) on bpffs, for `check`.
pub fn bpffs_state(pin: &PinDir) -> (bool, String) {
    let at = nearest_existing(pin.path());
    match is_bpffs(&at) {
        Ok(true) => (true, format!("{} is on bpffs", at.display())),
        Ok(false) if pin.path().starts_with("/sys/fs/bpf") => (
            true,
            "not mounted on /sys/fs/bpf; the daemon will mount it".into(),
        ),
        Ok(false) => (
            false,
            format!(
                "{} is not on bpffs and is not under /sys/fs/bpf",
                pin.path().display()
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

fn nearest_existing(p: &Path) -> PathBuf {
    let mut p = p.to_owned();
    while !p.exists() {
        if !p.pop() {
            return PathBuf::from("/");
        }
    }
    p
}

fn is_bpffs(p: &Path) -> Result<bool, GuardError> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err("statfs", p)(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io_err("statfs", p)(io::Error::last_os_error()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(at: &Path) -> Result<(), GuardError> {
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).expect("no NUL in path");
    // SAFETY: valid C strings; no data.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(io_err("mount bpffs on", at)(io::Error::last_os_error()));
    }
    info!(
        "mounted bpffs on {} (nothing was mounted there)",
        at.display()
    );
    Ok(())
}

/// A policy with every cgroup resolved to its id.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub policy: Policy,
    pub attach_id: u64,
    pub spawn_parent_id: u64,
    /// Per range (in policy order): the allowed cgroups' ids and levels.
    pub allowed: Vec<Vec<(u64, u32)>>,
}

impl Resolved {
    /// Resolves every cgroup of `policy`. The attach cgroup must exist; an allowed cgroup that
    /// does not exist yet gets id 0 (nothing in the map) until it appears.
    pub fn new(policy: Policy, cg: &Cgroup2, spawn_parent_id: u64) -> Result<Resolved, GuardError> {
        let attach_id = cg.id(&policy.attach)?;
        let mut allowed = Vec::new();
        for r in &policy.reserve {
            let mut ids = Vec::new();
            for a in &r.allow {
                if a.level() > MAX_CGROUP_LEVEL {
                    return Err(GuardError::TooDeep(a.clone()));
                }
                let id = match cg.id(a) {
                    Ok(id) => id,
                    Err(CgroupError::Missing { .. }) => 0,
                    Err(e) => return Err(e.into()),
                };
                ids.push((id, a.level()));
            }
            allowed.push(ids);
        }
        Ok(Resolved {
            policy,
            attach_id,
            spawn_parent_id,
            allowed,
        })
    }
}

/// The guard's maps, from a fresh load or from the pins.
pub struct Maps {
    pub ports: Array<MapData, PortEntry>,
    pub ranges: Array<MapData, RangeDef>,
    /// PG_RANGES mapped (it is `BPF_F_MMAPABLE`): reading the ranges costs no syscall, which
    /// is most of what an allocation costs beyond its probe.
    ranges_view: SharedWords,
    pub allowed: HashMap<MapData, u64, u64>,
    pub leases: HashMap<MapData, u32, Lease>,
    pub config: Array<MapData, GuardConfig>,
    pub counters: PerCpuArray<MapData, u64>,
    /// The allocators' shared memory (leased-port bitmap, generation, totals).
    pub alloc: AllocMap,
}

/// Every entry of `map`, read with BPF_MAP_LOOKUP_BATCH, `chunk` per syscall.
fn batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    chunk: u32,
    name: &'static str,
) -> Result<Vec<(K, V)>, GuardError> {
    use std::os::fd::AsFd as _;
    let (ks, vs) = sys::lookup_batch(map.fd().as_fd(), size_of::<K>(), size_of::<V>(), chunk)
        .map_err(syscall_err(name, "bpf_map_lookup_batch"))?;
    Ok(ks
        .chunks_exact(size_of::<K>())
        .zip(vs.chunks_exact(size_of::<V>()))
        // SAFETY: K and V are Pod: any bytes of their size are a value.
        .map(|(k, v)| unsafe {
            (
                std::ptr::read_unaligned(k.as_ptr().cast::<K>()),
                std::ptr::read_unaligned(v.as_ptr().cast::<V>()),
            )
        })
        .collect())
}

fn open_pinned(pin: &PinDir, name: &'static str) -> Result<Map, GuardError> {
    let data = MapData::from_pin(pin.file(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, GuardError> {
    ebpf.take_map(name).ok_or_else(|| GuardError::Map {
        name,
        source: Box::new(MapError::InvalidName { name: name.into() }),
    })
}

impl Maps {
    fn build(
        mut get: impl FnMut(&'static str) -> Result<Map, GuardError>,
    ) -> Result<Maps, GuardError> {
        use std::os::fd::AsFd as _;
        let ranges_map: Array<MapData, RangeDef> =
            get(MAP_RANGES)?.try_into().map_err(map_err(MAP_RANGES))?;
        let ranges_view = SharedWords::map(
            IterableMap::map(&ranges_map).fd().as_fd().as_raw_fd(),
            MAX_RANGES,
        )
        .map_err(syscall_err(MAP_RANGES, "mmap"))?;
        Ok(Maps {
            ports: get(MAP_PORTS)?.try_into().map_err(map_err(MAP_PORTS))?,
            ranges: ranges_map,
            ranges_view,
            allowed: get(MAP_ALLOWED)?.try_into().map_err(map_err(MAP_ALLOWED))?,
            leases: get(MAP_LEASES)?.try_into().map_err(map_err(MAP_LEASES))?,
            config: get(MAP_CONFIG)?.try_into().map_err(map_err(MAP_CONFIG))?,
            counters: get(MAP_COUNTERS)?
                .try_into()
                .map_err(map_err(MAP_COUNTERS))?,
            alloc: match get(MAP_ALLOC)? {
                Map::Array(data) => AllocMap::new(data).map_err(syscall_err(MAP_ALLOC, "mmap"))?,
                _ => {
                    return Err(GuardError::Map {
                        name: MAP_ALLOC,
                        source: Box::new(MapError::InvalidName {
                            name: MAP_ALLOC.into(),
                        }),
                    })
                }
            },
        })
    }

    /// Opens the pinned maps, checking the layout version.
    pub fn open(pin: &PinDir) -> Result<Maps, GuardError> {
        // An unreadable pin dir (mode 0700, not root) is a permission error, not "not loaded".
        let config = pin.file(MAP_CONFIG);
        match fs::symlink_metadata(&config) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && !pin.exists() => {
                return Err(GuardError::NotLoaded(pin.path().to_owned()));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("open pin", &config)(e)),
        }
        // The layout version first: pins of another layout may lack a map this one has.
        let config: Array<MapData, GuardConfig> = open_pinned(pin, MAP_CONFIG)?
            .try_into()
            .map_err(map_err(MAP_CONFIG))?;
        Maps::check_abi(&config, pin)?;
        Maps::build(|name| open_pinned(pin, name))
    }

    fn check_abi(config: &Array<MapData, GuardConfig>, pin: &PinDir) -> Result<(), GuardError> {
        let c = config.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
        // 0: created by an interrupted first load that never wrote its config.
        if c.abi != ABI_VERSION && c.abi != 0 {
            return Err(GuardError::Abi {
                dir: pin.path().to_owned(),
                found: c.abi,
                ours: ABI_VERSION,
            });
        }
        Ok(())
    }

    pub fn config(&self) -> Result<GuardConfig, GuardError> {
        self.config.get(&0, 0).map_err(map_err(MAP_CONFIG))
    }

    /// The configured ranges by slot, read from the mapping (no syscall).
    pub fn ranges(&self) -> Result<BTreeMap<u32, RangeDef>, GuardError> {
        const _: () = assert!(size_of::<RangeDef>() == 8);
        Ok(self
            .ranges_view
            .snapshot()
            .into_iter()
            .enumerate()
            .map(|(slot, w)| {
                // SAFETY: RangeDef is 8 bytes of plain integers: any bits are a value.
                let r: RangeDef = unsafe { std::mem::transmute::<u64, RangeDef>(w) };
                (slot as u32, r)
            })
            .filter(|(_, r)| r.in_use != 0)
            .collect())
    }

    /// Allowed cgroup id → range mask.
    pub fn allowed(&self) -> Result<StdHashMap<u64, u64>, GuardError> {
        self.allowed
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(MAP_ALLOWED))
    }

    /// Port → lease (a few syscalls, whatever the number of leases).
    pub fn leases(&self) -> Result<BTreeMap<u32, Lease>, GuardError> {
        Ok(
            batch::<u32, Lease>(IterableMap::map(&self.leases), 4096, MAP_LEASES)?
                .into_iter()
                .collect(),
        )
    }

    /// Counter totals for `slot`: [allowed, denied, audited] per protocol (tcp, udp).
    pub fn counters(&self, slot: u32) -> Result<[[u64; 3]; 2], GuardError> {
        let mut out = [[0u64; 3]; 2];
        for (proto, row) in out.iter_mut().enumerate() {
            for (kind, cell) in [COUNTER_ALLOWED, COUNTER_DENIED, COUNTER_AUDITED]
                .into_iter()
                .zip(row.iter_mut())
            {
                let values = self
                    .counters
                    .get(&counter_index(slot, proto as u32, kind), 0)
                    .map_err(map_err(MAP_COUNTERS))?;
                *cell = values.iter().sum();
            }
        }
        Ok(out)
    }

    /// Denial events the ring buffer had no room for, since the guard was first loaded.
    pub fn events_lost(&self) -> Result<u64, GuardError> {
        Ok(self
            .counters
            .get(&EVENTS_LOST_INDEX, 0)
            .map_err(map_err(MAP_COUNTERS))?
            .iter()
            .sum())
    }

    /// Writes `r` into the maps in an order that never opens a gap while the programs run:
    /// allowed cgroups before the ports they cover, stale ports cleared before stale allowed
    /// cgroups, and the level mask widened for the transition.
    pub fn write_policy(&mut self, r: &Resolved, features: Features) -> Result<(), GuardError> {
        let old_ranges = self.ranges()?;
        let old_allowed = self.allowed()?;
        let old_config = self.config()?;

        // Stable slots: a range that keeps its ports keeps its slot (and its counters). The
        // others take never-used slots first, then slots of ranges that are going away.
        let mut slots: Vec<Option<u32>> = Vec::new();
        for res in &r.policy.reserve {
            let keep = old_ranges.iter().find(|(s, d)| {
                d.first == res.spec.range.first
                    && d.last == res.spec.range.last
                    && !slots.contains(&Some(**s))
            });
            slots.push(keep.map(|(s, _)| *s));
        }
        let kept: Vec<u32> = slots.iter().flatten().copied().collect();
        let mut free: Vec<u32> = (0..MAX_RANGES as u32)
            .filter(|s| !old_ranges.contains_key(s))
            .chain(old_ranges.keys().copied().filter(|s| !kept.contains(s)))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let slots: Vec<u32> = slots
            .into_iter()
            .map(|s| {
                s.unwrap_or_else(|| {
                    free.pop()
                        .expect("at most MAX_RANGES ranges (checked by the policy)")
                })
            })
            .collect();
        let mut new_allowed: StdHashMap<u64, u64> = StdHashMap::new();
        let mut levels = 0u64;
        for (i, ids) in r.allowed.iter().enumerate() {
            for &(id, level) in ids.iter().filter(|(id, _)| *id != 0) {
                *new_allowed.entry(id).or_default() |= 1u64 << slots[i];
                levels |= 1u64 << level;
            }
        }
        if new_allowed.len() > MAX_ALLOWED as usize {
            return Err(GuardError::TooManyAllowed {
                count: new_allowed.len(),
                max: MAX_ALLOWED,
            });
        }

        let mut config = GuardConfig {
            abi: ABI_VERSION,
            mode: match r.policy.mode {
                Mode::Enforce => MODE_ENFORCE,
                Mode::Audit => MODE_AUDIT,
            },
            errno: r.policy.errno.raw(),
            flags: (old_config.flags & FLAG_PROTECT_EPHEMERAL)
                | if features.set_retval { FLAG_RETVAL } else { 0 },
            allowed_levels: levels | old_config.allowed_levels,
            attach_cgroup_id: r.attach_id,
            spawn_parent_id: r.spawn_parent_id,
        };
        self.config.set(0, config, 0).map_err(map_err(MAP_CONFIG))?;

        for (&id, &mask) in &new_allowed {
            // Keep old bits for the transition; trimmed below.
            let old = old_allowed.get(&id).copied().unwrap_or(0);
            self.allowed
                .insert(id, mask | old, 0)
                .map_err(map_err(MAP_ALLOWED))?;
        }

        let mut reserved = vec![false; 65536];
        for (i, res) in r.policy.reserve.iter().enumerate() {
            let slot = slots[i];
            let def = RangeDef {
                first: res.spec.range.first,
                last: res.spec.range.last,
                protocols: res.spec.protocols.0,
                in_use: 1,
            };
            self.ranges.set(slot, def, 0).map_err(map_err(MAP_RANGES))?;
            let entry = PortEntry {
                slot: slot as u16 + 1,
                protocols: res.spec.protocols.0,
            };
            for port in res.spec.range.ports() {
                reserved[port as usize] = true;
                self.ports
                    .set(u32::from(port), entry, 0)
                    .map_err(map_err(MAP_PORTS))?;
            }
        }
        for (&slot, def) in &old_ranges {
            for port in def.first..=def.last {
                if !reserved[port as usize] {
                    self.ports
                        .set(u32::from(port), PortEntry::default(), 0)
                        .map_err(map_err(MAP_PORTS))?;
                }
            }
            if !kept.contains(&slot) {
                if !slots.contains(&slot) {
                    self.ranges
                        .set(slot, RangeDef::default(), 0)
                        .map_err(map_err(MAP_RANGES))?;
                }
                // The slot's counters were the old range's.
                self.reset_counters(slot)?;
            }
        }

        for &id in old_allowed.keys() {
            match new_allowed.get(&id) {
                Some(&mask) => self.allowed.insert(id, mask, 0),
                None => self.allowed.remove(&id),
            }
            .map_err(map_err(MAP_ALLOWED))?;
        }
        config.allowed_levels = levels;
        self.config.set(0, config, 0).map_err(map_err(MAP_CONFIG))?;
        Ok(())
    }

    fn reset_counters(&mut self, slot: u32) -> Result<(), GuardError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
            io_err(
                "read possible cpus",
                Path::new("/sys/devices/system/cpu/possible"),
            )(e)
        })?;
        for proto in 0..2 {
            for kind in [COUNTER_ALLOWED, COUNTER_DENIED, COUNTER_AUDITED] {
                let zero = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                    .map_err(|e| io_err("build counters", Path::new(MAP_COUNTERS))(e))?;
                self.counters
                    .set(counter_index(slot, proto, kind), zero, 0)
                    .map_err(map_err(MAP_COUNTERS))?;
            }
        }
        Ok(())
    }

    /// Records in the config map whether ephemeral protection is in force.
    pub fn set_flag(&mut self, flag: u32, on: bool) -> Result<(), GuardError> {
        let mut c = self.config()?;
        if on {
            c.flags |= flag;
        } else {
            c.flags &= !flag;
        }
        self.config.set(0, c, 0).map_err(map_err(MAP_CONFIG))
    }
}

/// A loaded guard: the object (its programs and the event ring buffer) and the maps.
pub struct Guard {
    pub ebpf: Ebpf,
    pub maps: Maps,
    /// Whether pins of an earlier guard were found and taken over.
    pub adopted: bool,
}

impl Guard {
    /// Loads the object with its maps pinned (reused when already pinned), writes the policy and
    /// attaches. On a first load, any failure removes everything this call created.
    pub fn start(
        pin: &PinDir,
        r: &Resolved,
        features: Features,
        cg: &Cgroup2,
    ) -> Result<Guard, GuardError> {
        let adopted = pin.exists();
        if adopted {
            // Refuse a foreign layout before aya reuses its maps.
            Maps::open(pin)?;
        }
        let result = Guard::start_inner(pin, r, features, cg, adopted);
        if result.is_err() && !adopted {
            if let Err(e) = unload(pin) {
                warn!("cleaning up after a failed start: {e}");
            }
        }
        result
    }

    fn start_inner(
        pin: &PinDir,
        r: &Resolved,
        features: Features,
        cg: &Cgroup2,
        adopted: bool,
    ) -> Result<Guard, GuardError> {
        let use_retval: u32 = features.set_retval.into();
        // The programs' aya-log records are debug only: written when the agent logs debug.
        let log_level: u8 = if log::log_enabled!(log::Level::Debug) {
            4
        } else {
            3
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin.path())
            .override_global(GLOBAL_USE_RETVAL, &use_retval, true)
            .override_global(aya_log::LEVEL, &log_level, false)
            .load(OBJECT)
            .map_err(|e| GuardError::Load(Box::new(e)))?;
        let mut maps = Maps::build(|name| take(&mut ebpf, name))?;
        maps.write_policy(r, features)?;

        let dir = cg.dir(&r.policy.attach);
        let cgroup = File::open(&dir).map_err(io_err("open cgroup", &dir))?;
        // Load and attach both programs first, holding the links by fd only: a crash up to here
        // detaches them (the kernel drops a link with its last fd), so a first load is either
        // complete or leaves nothing attached. Loading (the verifier) is the slow part.
        let mut links = Vec::new();
        for (name, link_name) in LINKS {
            let prog_err = |what| {
                move |e| GuardError::Program {
                    what,
                    program: name,
                    source: Box::new(e),
                }
            };
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(ProgramError::InvalidName {
                    name: name.to_owned(),
                })
                .map_err(prog_err("find"))?
                .try_into()
                .map_err(prog_err("find"))?;
            prog.load().map_err(prog_err("load"))?;
            let id = prog
                // bpf_link_create takes no flags for cgroups (kernel/bpf/cgroup.c,
                // cgroup_bpf_link_attach): a cgroup link always joins the multi-program list.
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(prog_err("attach"))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(prog_err("attach"))?
                .try_into()
                .map_err(|e| GuardError::Link {
                    what: "take",
                    program: name,
                    source: Box::new(e),
                })?;
            links.push((name, link_name, link));
        }
        // Then pin both, back to back: the only window in which a crash leaves one hook pinned
        // without the other is between these two syscalls; `recover_pins` completes it at the
        // next start. Where old links are pinned, the new ones go under `_new` and are renamed
        // over them: the old link detaches only once the new one is in place.
        let mut staged = Vec::new();
        for (name, link_name, link) in links {
            let dst = pin.file(link_name);
            let at = if dst.exists() {
                pin.file(&format!("{link_name}_new"))
            } else {
                dst.clone()
            };
            let _ = fs::remove_file(pin.file(&format!("{link_name}_new")));
            let pinned = link.pin(&at).map_err(|e| GuardError::Pin {
                program: name,
                source: Box::new(e),
            })?;
            staged.push((at, dst, pinned));
        }
        for (at, dst, pinned) in staged {
            if at != dst {
                fs::rename(&at, &dst).map_err(io_err("rename pin to", &dst))?;
            }
            drop(pinned);
        }
        Ok(Guard {
            ebpf,
            maps,
            adopted,
        })
    }
}

/// Detaches the links and removes every pin and the pin dir.
pub fn unload(pin: &PinDir) -> Result<(), GuardError> {
    if !pin.path().exists() {
        return Err(GuardError::NotLoaded(pin.path().to_owned()));
    }
    // First, so that a failure (another network namespace) leaves the guard whole.
    if let Some(previous) = crate::ephemeral::restore(pin)? {
        info!("net.ipv4.ip_local_reserved_ports restored to {previous:?}");
    }
    for (_, link_name) in LINKS {
        for name in [link_name.to_owned(), format!("{link_name}_new")] {
            let path = pin.file(&name);
            if !path.exists() {
                continue;
            }
            // Detach now, even if a running daemon still holds the link open.
            match sys::obj_get(&path).and_then(|fd| sys::link_detach(&fd)) {
                Ok(()) => {}
                Err(e) => warn!(
                    "detaching {}: {e}; removing its pin instead",
                    path.display()
                ),
            }
            fs::remove_file(&path).map_err(io_err("remove pin", &path))?;
        }
    }
    let entries = fs::read_dir(pin.path()).map_err(io_err("read pin dir", pin.path()))?;
    for entry in entries {
        let entry = entry.map_err(io_err("read pin dir", pin.path()))?;
        let path = entry.path();
        fs::remove_file(&path).map_err(io_err("remove pin", &path))?;
    }
    fs::remove_dir(pin.path()).map_err(io_err("remove pin dir", pin.path()))?;
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A snapshot of the guard, for `status`.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub attached: bool,
    pub attach: String,
    pub mode: &'static str,
    pub errno: &'static str,
    /// What refused binds really get on this kernel.
    pub effective_errno: &'static str,
    pub protect_ephemeral: bool,
    pub spawn_parent: String,
    pub reserve: Vec<RangeStatus>,
    pub leases: Vec<LeaseStatus>,
    pub counters: Counters,
    /// Denials counted but not reported (the event ring buffer was full).
    pub events_lost: u64,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.allowed += o.allowed;
        self.denied += o.denied;
        self.audited += o.audited;
    }
}

#[derive(Debug, serde::Serialize)]
pub struct RangeStatus {
    pub ports: String,
    pub first: u16,
    pub last: u16,
    pub protocols: Vec<&'static str>,
    pub allow: Vec<String>,
    pub counters: Counters,
    pub tcp: Counters,
    pub udp: Counters,
}

#[derive(Debug, serde::Serialize)]
pub struct LeaseStatus {
    pub port: u32,
    pub cgroup: String,
    pub cgroup_id: u64,
    pub since: u64,
    pub age_secs: u64,
}

/// Names cgroup ids: by file handle (O(1)), or by one walk of the tree cached for later lookups.
pub struct CgroupNames<'a> {
    cg: &'a Cgroup2,
    cache: Option<StdHashMap<u64, CgroupPath>>,
    missing: StdHashMap<u64, std::time::Instant>,
    /// Whether id → path by file handle works here.
    handles: bool,
}

impl<'a> CgroupNames<'a> {
    pub fn new(cg: &'a Cgroup2) -> Self {
        CgroupNames {
            cg,
            cache: None,
            missing: StdHashMap::new(),
            handles: true,
        }
    }

    /// The path of `id`, or `(gone, id N)` for a cgroup that no longer exists.
    pub fn name(&mut self, id: u64) -> String {
        self.lookup(id)
            .map(|p| p.to_string())
            .unwrap_or_else(|| format!("(gone, id {id})"))
    }

    /// The path of `id` if it exists: from the cache, else from the cgroup's file handle, else
    /// (no handles here) by walking the tree again.
    pub fn lookup(&mut self, id: u64) -> Option<CgroupPath> {
        if let Some(p) = self.cache.as_ref().and_then(|c| c.get(&id)) {
            return Some(p.clone());
        }
        if self.handles {
            match self.cg.path_of(id) {
                Ok(found) => {
                    if let Some(p) = &found {
                        let cache = self.cache.get_or_insert_with(StdHashMap::new);
                        if cache.len() >= 65536 {
                            cache.clear();
                        }
                        cache.insert(id, p.clone());
                    }
                    return found;
                }
                Err(e) => {
                    debug!(
                        "cgroup id to path by file handle failed ({e}); walking the tree instead"
                    );
                    self.handles = false;
                }
            }
        }
        let fresh = self.cg.paths_by_id();
        let found = fresh.get(&id).cloned();
        self.cache = Some(fresh);
        found
    }

    /// Like [`CgroupNames::name`] for the denial log: a miss walks the tree again (a cgroup made
    /// after the last walk), but an id the walk did not find is not looked for again for
    /// `retry`, so a flood of denials from a vanished cgroup costs one walk.
    pub fn name_for_log(&mut self, id: u64, retry: std::time::Duration) -> String {
        if let Some(p) = self.cache.as_ref().and_then(|c| c.get(&id)) {
            return p.to_string();
        }
        if let Some(t) = self.missing.get(&id) {
            if t.elapsed() < retry {
                return format!("(gone, id {id})");
            }
        }
        match self.lookup(id) {
            Some(p) => {
                self.missing.remove(&id);
                p.to_string()
            }
            None => {
                if self.missing.len() > 4096 {
                    self.missing.clear();
                }
                self.missing.insert(id, std::time::Instant::now());
                format!("(gone, id {id})")
            }
        }
    }
}

/// Reads everything `status` shows from the pins.
pub fn status(pin: &PinDir, cg: &Cgroup2) -> Result<Status, GuardError> {
    let maps = Maps::open(pin)?;
    let config = maps.config()?;
    let mut names = CgroupNames::new(cg);
    let allowed = maps.allowed()?;
    let mut total = Counters::default();
    let mut reserve = Vec::new();
    for (slot, def) in maps.ranges()? {
        let spec = ReserveSpec {
            range: PortRange {
                first: def.first,
                last: def.last,
            },
            protocols: Protocols(def.protocols),
        };
        let mut allow: Vec<String> = allowed
            .iter()
            .filter(|(_, mask)| *mask & (1u64 << slot) != 0)
            .map(|(id, _)| names.name(*id))
            .collect();
        allow.sort();
        let c = maps.counters(slot)?;
        let per = |row: [u64; 3]| Counters {
            allowed: row[0],
            denied: row[1],
            audited: row[2],
        };
        let (tcp, udp) = (per(c[0]), per(c[1]));
        let mut counters = tcp;
        counters += udp;
        total += counters;
        reserve.push(RangeStatus {
            ports: spec.range.to_string(),
            first: def.first,
            last: def.last,
            protocols: spec.protocols.names(),
            allow,
            counters,
            tcp,
            udp,
        });
    }
    reserve.sort_by_key(|r| r.first);
    let now = now_secs();
    let leases = maps
        .leases()?
        .into_iter()
        .map(|(port, l)| LeaseStatus {
            port,
            cgroup: names.name(l.cgroup_id),
            cgroup_id: l.cgroup_id,
            since: l.since,
            age_secs: now.saturating_sub(l.since),
        })
        .collect();
    let errno = Errno::from_raw(config.errno).unwrap_or_default();
    let retval = config.flags & FLAG_RETVAL != 0;
    Ok(Status {
        pin_dir: pin.path().to_owned(),
        attached: pin.has_links(),
        attach: names.name(config.attach_cgroup_id),
        mode: if config.mode == MODE_AUDIT {
            "audit"
        } else {
            "enforce"
        },
        errno: errno.name(),
        effective_errno: if retval {
            errno.name()
        } else {
            Errno::Eperm.name()
        },
        protect_ephemeral: config.flags & FLAG_PROTECT_EPHEMERAL != 0,
        spawn_parent: if config.spawn_parent_id == 0 {
            String::new()
        } else {
            names.name(config.spawn_parent_id)
        },
        reserve,
        leases,
        counters: total,
        events_lost: maps.events_lost()?,
    })
}
