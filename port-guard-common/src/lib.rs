//! Types and constants shared by the eBPF programs and the agent.
//!
//! Every map the guard uses is described here once: its name (which is also its pin file name
//! under the pin dir), its size, and the `#[repr(C)]` layout of its keys and values. Ports in map
//! keys and values are in **host byte order**; the programs convert the kernel's network-order
//! `user_port` before any lookup.
#![no_std]

/// Bumped whenever a map layout below changes. The agent refuses to adopt pins written by a
/// different layout instead of misreading them.
///
/// 3: [`Lease`] gained `flags`, `expires` and `cpu_usec` (40 bytes; 24 before). A daemon of layout 3 started
/// over pins of layout 2 migrates the leases in place ([`LeaseV2`]).
pub const ABI_VERSION: u32 = 3;

/// Number of distinct reserved ranges. A range is one bit in an allowed cgroup's mask.
pub const MAX_RANGES: usize = 64;
/// Number of allowed cgroups (all ranges together).
pub const MAX_ALLOWED: u32 = 4096;
/// Number of simultaneous leases: one per port at most.
pub const MAX_LEASES: u32 = 65536;
/// Deepest level of an allowed cgroup, the last the allowed-cgroup walk looks at (the root is
/// level 0; `/machine.slice` is 1, a unit of `system.slice` 2, a Kubernetes container's scope
/// 4). Each level of the walk costs each bind program about 530 instructions of the
/// verifier's at every load: 63 levels verified 47,472 instructions a program (75-110 ms to load
/// on a 2-vCPU host, over a second under TCG), 15 verify 22,049 (25-35 ms). Callers may be
/// deeper: the walk reads their ancestors at these levels.
pub const MAX_CGROUP_LEVEL: u32 = 15;
/// Size of the denial event ring buffer in bytes (a power of two, multiple of the page size):
/// ~5,950 events of 88 bytes (the record and its header).
pub const EVENTS_BYTES: u32 = 512 * 1024;

/// `Array<PortEntry>` indexed by port (host order), 65536 entries: the O(1) "is it reserved" test.
pub const MAP_PORTS: &str = "PG_PORTS";
/// `Array<RangeDef>` indexed by range slot, [`MAX_RANGES`] entries: the ranges as configured.
/// Created `BPF_F_MMAPABLE`: allocators read it from their mapping.
pub const MAP_RANGES: &str = "PG_RANGES";
/// `HashMap<u64 cgroup id, u64 range mask>`: bit `s` set means the cgroup (and every cgroup below
/// it) may bind unleased ports of the range in slot `s`.
pub const MAP_ALLOWED: &str = "PG_ALLOWED";
/// `HashMap<u32 port (host order), Lease>`: a leased port is bindable only from its cgroup or below.
pub const MAP_LEASES: &str = "PG_LEASES";
/// `Array<GuardConfig>`, one entry: mode, errno and bookkeeping.
pub const MAP_CONFIG: &str = "PG_CONFIG";
/// `PerCpuArray<u64>` indexed by [`Slot::counter`], and [`EVENTS_LOST_INDEX`].
pub const MAP_COUNTERS: &str = "PG_COUNTERS";
/// `RingBuf` of [`DenialEvent`].
pub const MAP_EVENTS: &str = "PG_EVENTS";
/// `LruHashMap<u64 budget key, Offender>`, [`MAX_OFFENDERS`] entries: the event budget of
/// refused binds, per offender. The key ([`budget_key`]) is the uid of the refused process for
/// every uid but root's, so that the cgroups a user makes (a delegated subtree) share one budget
/// and making more buys no extra events; root's processes are budgeted per cgroup (root's cgroups
/// are the host's services, made by root). A refused bind produces an event only while its key
/// has credit (a key's first refusal always does), so a flood costs the agent a few events a
/// second; the refusals it did not report are counted here for the agent's "N more denials by X"
/// summary, and in [`MAP_COUNTERS`] exactly. One entry for all CPUs, updated without atomics
/// for the credit: the summaries of an offender refusing on several CPUs at once may miss a few.
/// Replaced `PG_OFFENDERS` (budgeted by cgroup alone, a layout without the uid): a daemon
/// adopting older pins creates it and removes the old one.
pub const MAP_BUDGET: &str = "PG_BUDGET";
/// `LruHashMap<u64 cgroup id, CgroupDenials>`, [`MAX_CGROUP_DENIALS`] entries: refusals per
/// cgroup of the non-root offenders of [`MAP_BUDGET`], so that a summary by uid names the
/// cgroups with their counts.
pub const MAP_CGROUP_DENIALS: &str = "PG_CG_DENIALS";
pub const MAX_CGROUP_DENIALS: u32 = 16384;
/// The pin of the map [`MAP_BUDGET`] replaced; a daemon that finds it removes it.
pub const MAP_OFFENDERS_OLD: &str = "PG_OFFENDERS";
/// Bit set in a [`MAP_BUDGET`] key that is a uid (cgroup ids, inode numbers, never have it).
pub const BUDGET_UID: u64 = 1 << 63;

/// The [`MAP_BUDGET`] key of a refusal by `uid` from cgroup `cgroup_id`.
#[inline(always)]
pub const fn budget_key(uid: u32, cgroup_id: u64) -> u64 {
    if uid == 0 {
        cgroup_id
    } else {
        BUDGET_UID | uid as u64
    }
}

/// `PerCpuArray<u64>` of [`STATS_LEN`]: what the programs count besides binds ([`STAT_BUDGET_NEW`],
/// [`STAT_CGROUP_NEW`]).
pub const MAP_STATS: &str = "PG_STATS";
/// Keys added to [`MAP_BUDGET`]: beyond its [`MAX_OFFENDERS`] entries each one evicted the least
/// recently refused one (the agent reports inserts minus live entries as evictions).
pub const STAT_BUDGET_NEW: u32 = 0;
/// Cgroups added to [`MAP_CGROUP_DENIALS`], the same way.
pub const STAT_CGROUP_NEW: u32 = 1;
pub const STATS_LEN: u32 = 8;

/// `HashMap<u64 netns cookie, u64 netns inode>`, [`MAX_NETNS`] entries: the network namespaces
/// the guard enforces in, when [`FLAG_NETNS_SCOPED`] is set (the inode is for `status`). Binds in
/// any other netns take nothing from the guarded ones' port spaces and pass, counted in
/// [`MAP_UNGUARDED`]. Added without a layout change: a daemon adopting older pins creates it.
pub const MAP_NETNS: &str = "PG_NETNS";
/// Network namespaces the guard can enforce in at once.
pub const MAX_NETNS: u32 = 256;
/// `PerCpuArray<u64>` indexed by [`Slot::proto_index`]:
/// binds of reserved ports let through because their netns is not guarded.
pub const MAP_UNGUARDED: &str = "PG_UNGUARDED";
/// Entries in [`MAP_UNGUARDED`].
pub const UNGUARDED_LEN: u32 = MAX_RANGES as u32 * 2;
/// `Array<u64>`, one entry, not pinned: where the agent's netns-learning program writes the
/// cookie of the netns a bind came from (how the agent learns a namespace's cookie on every
/// kernel; SO_NETNS_COOKIE needs 5.14).
pub const MAP_NETNS_LEARN: &str = "PG_NETNS_LEARN";

/// `HashMap<u64 socket cookie, u64 netns cookie>`, [`MAX_SENTINELS`] entries: the agent's
/// sentinel sockets. The post_bind programs refuse every bind that ends on the sentinel port
/// unless its socket is one of these, so a refused bind rewritten to the sentinel port can never
/// succeed there, whether a sentinel holds the port or not.
pub const MAP_SENTINELS: &str = "PG_SENTINELS";
pub const MAX_SENTINELS: u32 = 1024;
/// `HashMap<u64 netns cookie, u32 sentinel port>`, [`MAX_NETNS`] entries: the network
/// namespaces where a sentinel holds the port (TCP and UDP). Only there is a refused bind
/// rewritten to the sentinel port (EADDRINUSE from the kernel's own conflict check); elsewhere
/// it gets EPERM.
pub const MAP_SENTINEL_NETNS: &str = "PG_SENT_NETNS";

/// Offenders (uids, root's cgroups) tracked at once (least recently refused ones are forgotten
/// first).
pub const MAX_OFFENDERS: u32 = 4096;
/// Credit one denial event costs, in nanoseconds of elapsed time: 2 events a second.
pub const EVENT_COST_NS: u64 = 500_000_000;
/// Most credit an offender can save up: a burst of 4 events.
pub const EVENT_CREDIT_MAX_NS: u64 = 4 * EVENT_COST_NS;

/// `Array<u32>` indexed by range slot, [`MAX_RANGES`] entries: the per-child limit of the range,
/// the most sockets bound to its ports that one *unit* may hold at once (0: no limit). A unit is
/// the child of the allowed cgroup on the binding process's path (a VM's scope below
/// `/machine.slice`), or the allowed cgroup itself for its own processes. Added without a
/// layout change: a daemon adopting older pins creates it.
pub const MAP_LIMITS: &str = "PG_LIMITS";
/// `HashMap<ShareKey, u64>`, [`MAX_SHARES`] entries: sockets each unit holds now on ports of a
/// limited range. Counted by the programs with atomic adds: the bind program adds one and reads
/// the sum back, and refuses (taking its one back) when it went over the limit, so concurrent
/// binds of one unit never get past it; the release program takes one back when a charged
/// socket is released.
pub const MAP_SHARES: &str = "PG_SHARES";
pub const MAX_SHARES: u32 = 16384;
/// `HashMap<u64 socket cookie, ShareKey>`, [`MAX_CHARGES`] entries: which unit and range each
/// counted socket is charged to, so that it is uncharged exactly once, by whoever releases it.
pub const MAP_CHARGES: &str = "PG_CHARGES";
pub const MAX_CHARGES: u32 = 65536;
/// `PerCpuArray<u64>` indexed by [`Slot::reason_index`]: refused binds (or in audit mode
/// would-be refused ones) by why, [`REASON_NOT_ALLOWED`], [`REASON_LEASED`] or [`REASON_LIMIT`]
/// (each is counted in the denied or audited counters too).
pub const MAP_REASONS: &str = "PG_REASONS";
/// The reasons a bind is refused.
pub const REASONS: u32 = 3;
/// Entries in [`MAP_REASONS`].
pub const REASONS_LEN: u32 = MAX_RANGES as u32 * 2 * REASONS;

/// Key of [`MAP_SHARES`], value of [`MAP_CHARGES`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct ShareKey {
    /// The unit's cgroup id.
    pub unit: u64,
    /// The range slot.
    pub slot: u32,
    pub _pad: u32,
}

/// `Array<u64>` of [`ALLOC_ENTRIES`], created `BPF_F_MMAPABLE`: the allocators' shared memory.
/// Every process that leases (`spawn`, `lease`, the daemon) maps it and updates it with atomic
/// operations; the programs never read it. It holds:
/// - [`ALLOC_GENERATION`]: bumped by every claim, hand-over and release, so the daemon's reaper
///   knows when the lease map changed without reading it;
/// - [`ALLOC_ALLOCATIONS`] (ports leased), [`ALLOC_REQUESTS`], [`ALLOC_EXHAUSTIONS`],
///   `ALLOC_ENDED_*`: totals for the metrics;
/// - from [`ALLOC_BITMAP`], one bit per port (word `port / 64`, bit `port % 64`): set while the
///   port is leased. The bitmap is a hint that lets an allocator find the lowest unleased port
///   without reading the lease map: the lease map stays the authority (a claim is an insert with
///   BPF_NOEXIST), a clear bit over a lease costs one failed claim that sets it, and a set bit
///   without a lease is cleared by the daemon's next reconcile.
pub const MAP_ALLOC: &str = "PG_ALLOC";
pub const ALLOC_GENERATION: usize = 0;
pub const ALLOC_ALLOCATIONS: usize = 1;
pub const ALLOC_EXHAUSTIONS: usize = 2;
/// Leases ended, by how, for the metrics (layout 3 on; zero in pins of layout 2): by `release`,
/// because their cgroup was removed, because it emptied, because their TTL ran out.
pub const ALLOC_ENDED_RELEASED: usize = 3;
pub const ALLOC_ENDED_REMOVED: usize = 4;
pub const ALLOC_ENDED_EMPTIED: usize = 5;
pub const ALLOC_ENDED_EXPIRED: usize = 6;
/// Requests that got their ports (added after layout 3 with no layout change: [`ALLOC_ALLOCATIONS`]
/// counted requests before, and counts ports since).
pub const ALLOC_REQUESTS: usize = 7;
/// Sockets charged to a share: entries of [`MAP_CHARGES`], added by the bind programs after
/// each insert and taken back by whoever removes one (a program or the agent). While it is 0 the
/// release program skips the socket's cookie and its lookup. Zero in the pins of every guard
/// before the shares, which had no charges.
pub const ALLOC_CHARGED: usize = 8;
/// First word of the leased-port bitmap.
pub const ALLOC_BITMAP: usize = 16;
/// Words in the bitmap: 65,536 ports.
pub const ALLOC_BITMAP_WORDS: usize = 65536 / 64;
pub const ALLOC_ENTRIES: u32 = (ALLOC_BITMAP + ALLOC_BITMAP_WORDS) as u32;
/// `BPF_F_MMAPABLE` (kernel 5.5+).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Every map the object pins, by name (which is its pin file's name under the pin dir). The
/// programs declare each with this name; a test of the agent holds the object's maps against it.
pub const PINNED_MAPS: [&str; 19] = [
    MAP_PORTS,
    MAP_RANGES,
    MAP_ALLOWED,
    MAP_LEASES,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_ALLOC,
    MAP_EVENTS,
    MAP_BUDGET,
    MAP_CGROUP_DENIALS,
    MAP_STATS,
    MAP_NETNS,
    MAP_UNGUARDED,
    MAP_SENTINELS,
    MAP_SENTINEL_NETNS,
    MAP_LIMITS,
    MAP_SHARES,
    MAP_CHARGES,
    MAP_REASONS,
];

/// Program names in the object (the function names).
pub const PROG_BIND4: &str = "port_guard_bind4";
pub const PROG_BIND6: &str = "port_guard_bind6";
/// The agent's helper that learns a netns cookie: a bind4 program it attaches to a scratch
/// cgroup only, never to the attach cgroup.
pub const PROG_NETNS_LEARN: &str = "port_guard_netns_learn";
/// The post_bind programs that keep the sentinel port for the sentinels (attached only where the
/// guard refuses through the sentinel). The kernel keeps 15 bytes of a name: both are
/// [`PROG_POST_BIND_KERNEL_NAME`].
pub const PROG_POST_BIND4: &str = "port_guard_post_bind4";
pub const PROG_POST_BIND6: &str = "port_guard_post_bind6";
pub const PROG_POST_BIND_KERNEL_NAME: &str = "port_guard_post";
/// The `cgroup/sock_release` program: uncharges a socket counted in [`MAP_SHARES`] when it is
/// released (kernel 5.9+), whoever closes it.
pub const PROG_RELEASE: &str = "port_guard_release";

/// Load-time constant: 1 when the kernel has `bpf_set_retval` for cgroup sock_addr programs
/// (6.1+). With 0 the call is dead code the verifier removes, so the object loads on 5.10.
pub const GLOBAL_USE_RETVAL: &str = "USE_RETVAL";
/// Load-time constant: 1 when the kernel has `bpf_get_netns_cookie` for cgroup sock_addr
/// programs (5.7+, so every kernel the guard runs on; probed all the same). With 0 the guard
/// enforces in every netns.
pub const GLOBAL_USE_NETNS: &str = "USE_NETNS";

/// SO_MARK of the sentinel sockets ("pgsn"), set by the daemon (root: CAP_NET_ADMIN). The
/// programs rewrite a refused bind to the sentinel port only when a UDP socket carrying it holds
/// that port in the caller's netns (a socket lookup at the moment of refusal), and bind the
/// sentinel port itself only for sockets carrying it.
pub const SENTINEL_MARK: u32 = 0x7067_736e;

/// Load-time constant: the sentinel port, or 0 when the guard does not refuse through it (the
/// kernel gives the configured errno itself, or the sentinel is turned off). Where it is set, a
/// refused bind in a netns with a sentinel is rewritten to this port, and the kernel answers it
/// EADDRINUSE: the way to give EADDRINUSE without `bpf_set_retval` (before 6.1).
pub const GLOBAL_SENTINEL_PORT: &str = "SENTINEL_PORT";

/// Protocol bits in [`PortEntry::protocols`] and [`RangeDef::protocols`].
pub const PROTO_TCP: u16 = 1;
pub const PROTO_UDP: u16 = 2;

/// Kinds of counters, per range slot and protocol.
pub const COUNTER_ALLOWED: u32 = 0;
pub const COUNTER_DENIED: u32 = 1;
pub const COUNTER_AUDITED: u32 = 2;
pub const COUNTER_KINDS: u32 = 3;
/// Index in [`MAP_COUNTERS`] of the denial events the ring buffer had no room for (the
/// denials themselves are counted in full either way).
pub const EVENTS_LOST_INDEX: u32 = MAX_RANGES as u32 * 2 * COUNTER_KINDS;
/// Entries in [`MAP_COUNTERS`].
pub const COUNTERS_LEN: u32 = EVENTS_LOST_INDEX + 1;

/// `GuardConfig::mode` values.
pub const MODE_ENFORCE: u32 = 0;
pub const MODE_AUDIT: u32 = 1;

/// [`PortEntry::slot`] of a sentinel port: the configured one, or one the daemon took in a netns
/// where another socket held it first ([`MAP_SENTINEL_NETNS`] says which netns uses which). Binds
/// of it are the sentinels' alone (in the netns that uses it).
pub const SLOT_SENTINEL: u16 = u16::MAX;

/// Value of [`MAP_PORTS`]. `slot` is the range slot plus one; 0 means "not reserved";
/// [`SLOT_SENTINEL`] a sentinel port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PortEntry {
    pub slot: u16,
    pub protocols: u16,
}

/// Value of [`MAP_RANGES`]. `in_use` is 1 for a configured slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RangeDef {
    pub first: u16,
    pub last: u16,
    pub protocols: u16,
    pub in_use: u16,
}

/// Value of [`MAP_LEASES`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Lease {
    /// The lessee cgroup's id (its inode number on the cgroup2 mount).
    pub cgroup_id: u64,
    /// The lessee cgroup's level (root = 0): the program compares the caller's ancestor at this
    /// level with `cgroup_id`, one helper call whatever the depth.
    pub level: u32,
    /// [`LEASE_UNTIL_EMPTY`]; the programs never read it.
    pub flags: u32,
    /// When the lease was made, seconds since the Unix epoch.
    pub since: u64,
    /// When the lease runs out, in CLOCK_BOOTTIME seconds (steps of the wall clock do not move
    /// it; pins do not outlive a boot), or 0: no TTL. The daemon ends it then; the programs never
    /// read it.
    pub expires: u64,
    /// The lessee's CPU time (`cpu.stat` usage_usec) when the lease was made, or u64::MAX when
    /// unknown: more CPU time later proves a process ran in it since, however briefly, which is
    /// what "once populated" means for [`LEASE_UNTIL_EMPTY`]. The programs never read it.
    pub cpu_usec: u64,
}

/// The lease also ends when its cgroup, once populated, has no process left (what a `spawn`
/// lease always does; `lease --until-empty`, and leases migrated from layout 2, which had no
/// other lifetime).
pub const LEASE_UNTIL_EMPTY: u32 = 1;

/// Value of [`MAP_LEASES`] in layout 2 (before [`ABI_VERSION`] 3), read once by the migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LeaseV2 {
    pub cgroup_id: u64,
    pub level: u32,
    pub _pad: u32,
    pub since: u64,
}

/// Value of [`MAP_CONFIG`] slot 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GuardConfig {
    /// [`ABI_VERSION`] of the agent that wrote it.
    pub abi: u32,
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`].
    pub mode: u32,
    /// Positive errno a refused bind returns where the kernel can set it (EPERM, EACCES,
    /// EADDRINUSE).
    pub errno: u32,
    /// Bit flags, [`FLAG_PROTECT_EPHEMERAL`].
    pub flags: u32,
    /// Bit `l` set when some allowed cgroup sits at level `l`: the walk skips other levels.
    pub allowed_levels: u64,
    /// The attach cgroup's id, for `status`.
    pub attach_cgroup_id: u64,
    /// The spawn parent cgroup's id, for `status` and the allocator.
    pub spawn_parent_id: u64,
}

/// SO_MARK of the allocator's probe sockets ("pgpr"): their binds are the agent testing a port,
/// not a VM binding it, and are not counted as allowed. Setting SO_MARK needs CAP_NET_ADMIN, and a
/// socket carrying it is refused like any other when it is not permitted.
pub const PROBE_MARK: u32 = 0x7067_7072;

/// The reserved ranges were merged into net.ipv4.ip_local_reserved_ports.
pub const FLAG_PROTECT_EPHEMERAL: u32 = 1;
/// The kernel sets the configured errno (bpf_set_retval); without it refused binds get EPERM.
pub const FLAG_RETVAL: u32 = 2;
/// Enforce only in the network namespaces of [`MAP_NETNS`]. Clear: in every netns (what pins of
/// an older daemon, which never set it, mean).
pub const FLAG_NETNS_SCOPED: u32 = 4;
/// The programs refuse through the sentinel port ([`GLOBAL_SENTINEL_PORT`]), for `status`.
pub const FLAG_SENTINEL: u32 = 8;
/// Some range has a per-child limit ([`MAP_LIMITS`]): the release program looks for charged
/// sockets only while this is set.
pub const FLAG_SHARES: u32 = 16;

/// Event kinds in [`DenialEvent::action`].
pub const ACTION_DENIED: u8 = 1;
pub const ACTION_AUDITED: u8 = 2;

/// Why a bind was refused, in [`DenialEvent::reason`]: the port is reserved and the caller's
/// cgroup is not allowed for its range.
pub const REASON_NOT_ALLOWED: u8 = 0;
/// The port is leased to another cgroup (what layout-2 programs wrote as `leased = 1`).
pub const REASON_LEASED: u8 = 1;
/// The caller's unit holds as many ports of the range as its per-child limit allows.
pub const REASON_LIMIT: u8 = 2;

/// One refused (or, in audit mode, would-be-refused) bind, sent through [`MAP_EVENTS`].
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct DenialEvent {
    pub cgroup_id: u64,
    /// Thread id (kernel pid).
    pub pid: u32,
    /// Process id (kernel tgid).
    pub tgid: u32,
    /// Port, host order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// 4 or 6: the hook that saw it (a v4-mapped bind on a v6 socket is 6).
    pub family: u8,
    /// [`ACTION_DENIED`] or [`ACTION_AUDITED`].
    pub action: u8,
    /// [`REASON_NOT_ALLOWED`], [`REASON_LEASED`] or [`REASON_LIMIT`].
    pub reason: u8,
    /// With [`REASON_LIMIT`]: the sockets the unit held (at least its limit).
    pub held: u16,
    /// The errno the caller got, or in audit mode would have got.
    pub errno: u32,
    pub comm: [u8; 16],
    /// The netns the bind came from (its cookie); 0 when the kernel cannot tell. Added at the
    /// end: the agent reads records of [`DENIAL_EVENT_V1_LEN`] bytes (older programs, still
    /// attached while a new daemon takes over) without it.
    pub netns_cookie: u64,
    /// With [`REASON_LIMIT`]: the unit's cgroup id. (This and the fields after it: records of
    /// [`DENIAL_EVENT_V2_LEN`] bytes and more.)
    pub unit_id: u64,
    /// When the bind was refused: `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME), so that a refusal
    /// logged late (after a restart) keeps its time.
    pub time_ns: u64,
    /// The refused process's uid.
    pub uid: u32,
    /// With [`REASON_LIMIT`]: the range's limit.
    pub limit: u32,
}

/// Size of a [`DenialEvent`] record before `netns_cookie` was added.
pub const DENIAL_EVENT_V1_LEN: usize = 48;
/// Size of a [`DenialEvent`] record before `unit_id`, `time_ns`, `uid` and `limit`.
pub const DENIAL_EVENT_V2_LEN: usize = 56;

/// Value of [`MAP_BUDGET`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Offender {
    /// Event credit in nanoseconds (at most [`EVENT_CREDIT_MAX_NS`]), as of `last_ns`.
    pub credit_ns: u64,
    /// bpf_ktime_get_ns() of the last denial.
    pub last_ns: u64,
    /// Denials (or audited would-be denials) of this key.
    pub denials: u64,
    /// Of them, those sent through the ring buffer (an event the ring buffer had no room for is
    /// not: it stays in the summary).
    pub reported: u64,
    /// The last denial: its cgroup, uid, process, port (host order), protocol bit, family.
    pub last_cgroup: u64,
    pub uid: u32,
    pub last_tgid: u32,
    pub last_port: u16,
    pub last_protocol: u8,
    pub last_family: u8,
    /// The errno it got (or in audit mode would have got).
    pub last_errno: u32,
    pub last_comm: [u8; 16],
    /// [`ACTION_DENIED`] or [`ACTION_AUDITED`], and the `REASON_*`.
    pub last_action: u8,
    pub last_reason: u8,
    pub _pad: [u8; 6],
}

/// Value of [`MAP_CGROUP_DENIALS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct CgroupDenials {
    pub denials: u64,
    pub uid: u32,
    pub _pad: u32,
}

/// A protocol the guard checks: its bit in [`PortEntry::protocols`] and [`RangeDef::protocols`],
/// and its index in the counter maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    /// 0 for TCP, 1 for UDP.
    #[inline(always)]
    pub const fn index(self) -> u32 {
        match self {
            Proto::Tcp => 0,
            Proto::Udp => 1,
        }
    }

    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    #[inline(always)]
    pub const fn bit(self) -> u16 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    /// `tcp` or `udp`.
    pub const fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// The protocol of a bit ([`DenialEvent::protocol`] and the like).
    pub const fn from_bit(bit: u16) -> Option<Proto> {
        match bit {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    /// Whether `protocols` (a set of bits) holds this one.
    #[inline(always)]
    pub const fn in_set(self, protocols: u16) -> bool {
        protocols & self.bit() != 0
    }
}

/// A range slot, below [`MAX_RANGES`] by construction: its bit in an allowed cgroup's mask and its
/// place in the per-slot maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(u32);

impl Slot {
    /// Slot `i`, if it is one.
    #[inline(always)]
    pub const fn new(i: u32) -> Option<Slot> {
        if i < MAX_RANGES as u32 {
            Some(Slot(i))
        } else {
            None
        }
    }

    /// The slot a [`PortEntry::slot`] names (it holds the slot plus one): None for a port that is
    /// not reserved, and for [`SLOT_SENTINEL`].
    #[inline(always)]
    pub const fn of_entry(entry_slot: u16) -> Option<Slot> {
        if entry_slot == 0 {
            None
        } else {
            Slot::new(entry_slot as u32 - 1)
        }
    }

    /// Every slot, in order.
    pub fn all() -> impl Iterator<Item = Slot> {
        (0..MAX_RANGES as u32).map(Slot)
    }

    /// What [`PortEntry::slot`] holds for this slot.
    pub const fn entry(self) -> u16 {
        self.0 as u16 + 1
    }

    #[inline(always)]
    pub const fn index(self) -> u32 {
        self.0
    }

    /// The slot's bit in an allowed cgroup's range mask ([`MAP_ALLOWED`]).
    #[inline(always)]
    pub const fn bit(self) -> u64 {
        1u64 << self.0
    }

    /// Index in the maps counted per slot and protocol ([`MAP_UNGUARDED`]).
    #[inline(always)]
    pub const fn proto_index(self, proto: Proto) -> u32 {
        self.0 * 2 + proto.index()
    }

    /// Index in [`MAP_REASONS`] of `reason` (`REASON_*`, below [`REASONS`]).
    #[inline(always)]
    pub const fn reason_index(self, proto: Proto, reason: u8) -> u32 {
        self.proto_index(proto) * REASONS + reason as u32
    }

    /// Index in [`MAP_COUNTERS`] of counter `kind` ([`COUNTER_ALLOWED`], ...).
    #[inline(always)]
    pub const fn counter(self, proto: Proto, kind: u32) -> u32 {
        self.proto_index(proto) * COUNTER_KINDS + kind
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, and have explicit padding, so every bit pattern
    // is a valid value.
    unsafe impl aya::Pod for super::PortEntry {}
    unsafe impl aya::Pod for super::RangeDef {}
    unsafe impl aya::Pod for super::Lease {}
    unsafe impl aya::Pod for super::LeaseV2 {}
    unsafe impl aya::Pod for super::GuardConfig {}
    unsafe impl aya::Pod for super::DenialEvent {}
    unsafe impl aya::Pod for super::Offender {}
    unsafe impl aya::Pod for super::CgroupDenials {}
    unsafe impl aya::Pod for super::ShareKey {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<PortEntry>(), 4);
        assert_eq!(size_of::<RangeDef>(), 8);
        assert_eq!(size_of::<Lease>(), 40);
        assert_eq!(size_of::<LeaseV2>(), 24);
        // Layout 3 kept layout 2's prefix: the programs read only these two fields.
        assert_eq!(core::mem::offset_of!(Lease, cgroup_id), 0);
        assert_eq!(core::mem::offset_of!(Lease, level), 8);
        assert_eq!(core::mem::offset_of!(Lease, since), 16);
        assert_eq!(core::mem::offset_of!(Lease, expires), 24);
        assert_eq!(core::mem::offset_of!(Lease, cpu_usec), 32);
        assert_eq!(size_of::<GuardConfig>(), 40);
        assert_eq!(size_of::<DenialEvent>(), 80);
        assert_eq!(
            core::mem::offset_of!(DenialEvent, netns_cookie),
            DENIAL_EVENT_V1_LEN
        );
        assert_eq!(
            core::mem::offset_of!(DenialEvent, unit_id),
            DENIAL_EVENT_V2_LEN
        );
        // The old `leased` byte is `reason`: 1 still means leased.
        assert_eq!(core::mem::offset_of!(DenialEvent, reason), 21);
        assert_eq!(size_of::<Offender>(), 80);
        assert_eq!(size_of::<CgroupDenials>(), 16);
        assert_eq!(size_of::<ShareKey>(), 16);
    }

    #[test]
    fn slots_and_protocols_index_the_maps() {
        assert_eq!(Slot::new(MAX_RANGES as u32), None);
        let last = Slot::new(MAX_RANGES as u32 - 1).unwrap();
        assert_eq!(last.bit(), 1 << 63);
        assert_eq!(last.proto_index(Proto::Udp) + 1, UNGUARDED_LEN);
        assert_eq!(last.reason_index(Proto::Udp, REASON_LIMIT) + 1, REASONS_LEN);
        assert_eq!(
            last.counter(Proto::Udp, COUNTER_KINDS - 1) + 1,
            EVENTS_LOST_INDEX
        );
        for (i, s) in Slot::all().enumerate() {
            assert_eq!(s.index(), i as u32);
            assert_eq!(Slot::of_entry(s.entry()), Some(s));
            for p in Proto::ALL {
                assert_eq!(Proto::from_bit(p.bit()), Some(p));
            }
        }
        assert_eq!(Slot::all().count(), MAX_RANGES);
        assert_eq!(Slot::of_entry(0), None);
        assert_eq!(Slot::of_entry(SLOT_SENTINEL), None);
        assert_eq!(budget_key(0, 42), 42);
        assert_eq!(budget_key(65534, 42), BUDGET_UID | 65534);
    }

    #[test]
    fn counter_indices_are_distinct_and_in_bounds() {
        // Every slot, protocol and kind has a cell of its own below the lost-events one.
        let mut seen = [false; COUNTERS_LEN as usize];
        for s in Slot::all() {
            for p in Proto::ALL {
                for kind in [COUNTER_ALLOWED, COUNTER_DENIED, COUNTER_AUDITED] {
                    let i = s.counter(p, kind);
                    assert!(i < EVENTS_LOST_INDEX);
                    assert!(!seen[i as usize]);
                    seen[i as usize] = true;
                }
            }
        }
        assert_eq!(EVENTS_LOST_INDEX, COUNTERS_LEN - 1);
        assert!(!seen[EVENTS_LOST_INDEX as usize]);
    }
}
