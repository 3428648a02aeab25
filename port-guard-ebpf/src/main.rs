//! The guard: `cgroup/bind4` and `cgroup/bind6` programs that refuse reserved ports, and the
//! `cgroup/sock_release` program that keeps the per-child shares exact.
//!
//! Both bind hooks call [`decide`]. The common bind (port not reserved) costs one array lookup. A
//! reserved port in a network namespace the guard does not enforce in passes at once (one
//! helper call and one hash lookup, when the guard is scoped to some namespaces). A reserved
//! port is then checked against its lease (one helper call: the caller's ancestor at the
//! lessee's level) or, unleased, against the allowed cgroups of its range (one hash lookup per
//! level that holds an allowed cgroup) and, where the range has a per-child limit, against the
//! share of the caller's unit ([`share`]). Everything else is refused ([`refuse`]): answered
//! with the errno [`answer`] chooses, counted, and reported through the ring buffer while the
//! offender has event credit ([`report`]).
//!
//! # Minimum kernel version
//! 5.9 (ring buffer 5.8; cgroup bpf_link 5.7; `cgroup/sock_release` 5.9). `bpf_set_retval` for
//! sock_addr hooks needs 6.1: the agent probes for it and loads with `USE_RETVAL = 0` on older
//! kernels, where a refused bind gets EADDRINUSE through the sentinel port, or EPERM.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::AtomicOrdering;

use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_ktime_get_ns, bpf_set_retval,
            bpf_sk_lookup_udp, bpf_sk_release,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::debug;
use port_guard_common::{
    ALLOC_CHARGED,
    budget_key, CgroupDenials, DenialEvent, GuardConfig, Lease, Offender, PortEntry, Proto,
    RangeDef, ShareKey, Slot, ACTION_AUDITED, ACTION_DENIED, ALLOC_ENTRIES, BPF_F_MMAPABLE,
    COUNTERS_LEN, COUNTER_ALLOWED, COUNTER_AUDITED, COUNTER_DENIED, EVENTS_BYTES,
    EVENTS_LOST_INDEX, EVENT_COST_NS, EVENT_CREDIT_MAX_NS, FLAG_NETNS_SCOPED, FLAG_SHARES,
    MAX_ALLOWED, MAX_CGROUP_DENIALS, MAX_CGROUP_LEVEL, MAX_CHARGES, MAX_LEASES, MAX_NETNS,
    MAX_OFFENDERS, MAX_RANGES, MAX_SENTINELS, MAX_SHARES, MODE_AUDIT, PROBE_MARK, REASONS,
    REASONS_LEN, REASON_LEASED, REASON_LIMIT, REASON_NOT_ALLOWED, SENTINEL_MARK, SLOT_SENTINEL,
    STATS_LEN, STAT_BUDGET_NEW, STAT_CGROUP_NEW, UNGUARDED_LEN,
};

/// Set by the agent at load time (`EbpfLoader::override_global`). Read with `read_volatile` so the
/// compiler keeps the load and the verifier, seeing a frozen `.rodata` value, prunes the branch:
/// on 5.10 a reachable call to `bpf_set_retval` fails with "invalid func unknown#187".
#[no_mangle]
static USE_RETVAL: u32 = 1;

/// Set by the agent at load time like [`USE_RETVAL`]: 0 where the kernel has no
/// `bpf_get_netns_cookie` for sock_addr programs (then the guard enforces in every netns).
#[no_mangle]
static USE_NETNS: u32 = 1;

/// Set by the agent at load time: the configured sentinel port (host order), or 0 when refusals
/// do not go through the sentinel (port_guard_common::GLOBAL_SENTINEL_PORT). A netns whose
/// sentinel had to take another port says so in `PG_SENT_NETNS`.
#[no_mangle]
static SENTINEL_PORT: u32 = 0;

// The map names below are port_guard_common::PINNED_MAPS (the pin file names); the agent's
// tests hold the object against that list.
#[map(name = "PG_PORTS")]
static PG_PORTS: Array<PortEntry> = Array::pinned(65536, 0);

#[map(name = "PG_RANGES")]
/// Mmapable so that allocators read the ranges without a syscall.
static PG_RANGES: Array<RangeDef> = Array::pinned(MAX_RANGES as u32, BPF_F_MMAPABLE);

#[map(name = "PG_ALLOWED")]
static PG_ALLOWED: HashMap<u64, u64> = HashMap::pinned(MAX_ALLOWED, 0);

#[map(name = "PG_LEASES")]
static PG_LEASES: HashMap<u32, Lease> = HashMap::pinned(MAX_LEASES, 0);

#[map(name = "PG_CONFIG")]
static PG_CONFIG: Array<GuardConfig> = Array::pinned(1, 0);

#[map(name = "PG_COUNTERS")]
static PG_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_LEN, 0);

/// Shared memory of the lease allocators (userspace only, mmapped); declared here so it is
/// created and pinned with the others.
#[map(name = "PG_ALLOC")]
static PG_ALLOC: Array<u64> = Array::pinned(ALLOC_ENTRIES, BPF_F_MMAPABLE);

#[map(name = "PG_EVENTS")]
static PG_EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map(name = "PG_NETNS")]
static PG_NETNS: HashMap<u64, u64> = HashMap::pinned(MAX_NETNS, 0);

#[map(name = "PG_UNGUARDED")]
static PG_UNGUARDED: PerCpuArray<u64> = PerCpuArray::pinned(UNGUARDED_LEN, 0);

/// Written by [`port_guard_netns_learn`] only; the agent's own, not pinned.
#[map(name = "PG_NETNS_LEARN")]
static PG_NETNS_LEARN: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "PG_SENTINELS")]
static PG_SENTINELS: HashMap<u64, u64> = HashMap::pinned(MAX_SENTINELS, 0);

/// Where the daemon's sentinels hold their port, and which port: netns cookie → port.
#[map(name = "PG_SENT_NETNS")]
static PG_SENT_NETNS: HashMap<u64, u32> = HashMap::pinned(MAX_NETNS, 0);

#[map(name = "PG_BUDGET")]
static PG_BUDGET: LruHashMap<u64, Offender> = LruHashMap::pinned(MAX_OFFENDERS, 0);

#[map(name = "PG_CG_DENIALS")]
static PG_CG_DENIALS: LruHashMap<u64, CgroupDenials> = LruHashMap::pinned(MAX_CGROUP_DENIALS, 0);

#[map(name = "PG_STATS")]
static PG_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_LEN, 0);

#[map(name = "PG_LIMITS")]
static PG_LIMITS: Array<u32> = Array::pinned(MAX_RANGES as u32, 0);

#[map(name = "PG_SHARES")]
static PG_SHARES: HashMap<ShareKey, u64> = HashMap::pinned(MAX_SHARES, 0);

#[map(name = "PG_CHARGES")]
static PG_CHARGES: HashMap<u64, ShareKey> = HashMap::pinned(MAX_CHARGES, 0);

#[map(name = "PG_REASONS")]
static PG_REASONS: PerCpuArray<u64> = PerCpuArray::pinned(REASONS_LEN, 0);

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
/// MPTCP listens on TCP ports: treat it as TCP or it would be a way around a tcp range.
const IPPROTO_MPTCP: u32 = 262;
const EPERM: u32 = 1;
const EADDRINUSE: u32 = 98;
/// `struct bpf_sock_tuple`'s ipv4 and ipv6 parts.
const TUPLE4_LEN: u32 = 12;
const TUPLE6_LEN: u32 = 36;

/// bind() proceeds.
const ALLOW: i32 = 1;
/// bind() fails (EPERM, or the errno set with bpf_set_retval).
const DENY: i32 = 0;

#[cgroup_sock_addr(bind4)]
pub fn port_guard_bind4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, 4)
}

#[cgroup_sock_addr(bind6)]
pub fn port_guard_bind6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, 6)
}

/// The agent's helper, attached to a scratch cgroup only: records the cookie of the netns a bind
/// comes from, and refuses the bind.
#[cgroup_sock_addr(bind4)]
pub fn port_guard_netns_learn(ctx: SockAddrContext) -> i32 {
    if unsafe { core::ptr::read_volatile(&USE_NETNS) } != 0 {
        let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
        if let Some(slot) = PG_NETNS_LEARN.get_ptr_mut(0) {
            unsafe { *slot = cookie };
        }
    }
    DENY
}

/// Keeps the sentinel ports for the sentinels: a bind that ends on the sentinel port of its
/// netns from any other socket fails with EPERM. Above all, a refused bind that [`refuse`]
/// rewrote to the sentinel port fails here when no sentinel held the port (the daemon stopped
/// without handing its sockets to the service manager, or the netns has none): it never succeeds
/// on another port.
#[cgroup_sock(post_bind4)]
pub fn port_guard_post_bind4(ctx: SockContext) -> i32 {
    post_bind(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn port_guard_post_bind6(ctx: SockContext) -> i32 {
    post_bind(&ctx)
}

#[inline(always)]
fn post_bind(ctx: &SockContext) -> i32 {
    let configured = unsafe { core::ptr::read_volatile(&SENTINEL_PORT) };
    if configured == 0 {
        return ALLOW;
    }
    // src_port is in host byte order here.
    let port = unsafe { (*ctx.sock).src_port };
    match PG_PORTS.get(port) {
        Some(e) if e.slot == SLOT_SENTINEL => {}
        _ => return ALLOW,
    }
    if port != configured {
        // A port a sentinel took in place of the configured one: the sentinels' only in the
        // netns that uses it.
        let netns = unsafe { bpf_get_netns_cookie(ctx.sock.cast()) };
        match unsafe { PG_SENT_NETNS.get(&netns) } {
            Some(p) if *p == port => {}
            _ => return ALLOW,
        }
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    if unsafe { PG_SENTINELS.get(&cookie) }.is_some() {
        ALLOW
    } else {
        DENY
    }
}

/// Uncharges a socket counted in a unit's share when it is released: once, whoever closes it
/// (a process killed with SIGKILL included). Costs one array lookup for every socket while no
/// range has a per-child limit, two while no socket is charged; only while some socket is, a
/// TCP or UDP socket also costs its cookie and one hash lookup (a release program cannot read
/// the socket's port, so it cannot tell a socket bound outside every range without looking).
#[cgroup_sock(sock_release)]
pub fn port_guard_release(ctx: SockContext) -> i32 {
    if !PG_CONFIG.get(0).is_some_and(|c| c.flags & FLAG_SHARES != 0) {
        return ALLOW;
    }
    match unsafe { (*ctx.sock).protocol } {
        IPPROTO_TCP | IPPROTO_MPTCP | IPPROTO_UDP => {}
        _ => return ALLOW,
    }
    // No socket charged anywhere (most of the time on a host: a VM's migration sockets are
    // charged only while they exist): nothing to look up.
    if PG_ALLOC.get(ALLOC_CHARGED as u32).is_none_or(|n| *n == 0) {
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    if let Some(key) = unsafe { PG_CHARGES.get(&cookie) } {
        let key = *key;
        forget_charge(cookie, &key);
    }
    ALLOW
}

/// The cookie of the caller's netns, or 0 where the kernel cannot tell.
#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    if unsafe { core::ptr::read_volatile(&USE_NETNS) } == 0 {
        return 0;
    }
    unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }
}

/// The sentinel port of the netns with cookie `netns`: the one its sentinel took, else the
/// configured one.
#[inline(always)]
fn sentinel_of(netns: u64, configured: u32) -> u32 {
    match unsafe { PG_SENT_NETNS.get(&netns) } {
        Some(p) => *p,
        None => configured,
    }
}

/// Whether a sentinel holds `port` in the caller's netns now: a UDP socket bound there that
/// carries [`SENTINEL_MARK`] (only root can set it). The daemon closes its UDP sentinel before its
/// TCP one, so a lookup that finds the one means the other is there too.
#[inline(always)]
fn sentinel_present(ctx: &SockAddrContext, family: u8, port: u32) -> bool {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let dport = (port as u16).to_be();
    let sk = if family == 4 {
        tuple.__bindgen_anon_1.ipv4.dport = dport;
        unsafe {
            bpf_sk_lookup_udp(
                ctx.sock_addr.cast(),
                &mut tuple,
                TUPLE4_LEN,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        }
    } else {
        tuple.__bindgen_anon_1.ipv6.dport = dport;
        unsafe {
            bpf_sk_lookup_udp(
                ctx.sock_addr.cast(),
                &mut tuple,
                TUPLE6_LEN,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        }
    };
    if sk.is_null() {
        return false;
    }
    let ours = unsafe { (*sk).mark } == SENTINEL_MARK;
    unsafe { bpf_sk_release(sk.cast()) };
    ours
}

/// A bind to a sentinel port: the sentinels' own pass; any other answers as the port is (taken by
/// the sentinel: EADDRINUSE), or EPERM when no sentinel holds it, so that nobody can take it from
/// the daemon between two of its runs. A port a sentinel took in place of the configured one
/// (another socket held that in its netns) is the sentinels' only in that netns.
#[inline(always)]
fn sentinel_port_bind(ctx: &SockAddrContext, family: u8, port: u16) -> i32 {
    let configured = unsafe { core::ptr::read_volatile(&SENTINEL_PORT) };
    if configured == 0 {
        return ALLOW;
    }
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if !sk.is_null() && unsafe { (*sk).mark } == SENTINEL_MARK {
        return ALLOW;
    }
    let port = u32::from(port);
    if port != configured && sentinel_of(netns_cookie(ctx), configured) != port {
        return ALLOW;
    }
    if sentinel_present(ctx, family, port) {
        // The kernel's conflict check answers EADDRINUSE (post_bind catches a lost race).
        return ALLOW;
    }
    if unsafe { core::ptr::read_volatile(&USE_RETVAL) } != 0 {
        // Minimum kernel version 6.1 for sock_addr programs; pruned on older kernels.
        unsafe { bpf_set_retval(-(EADDRINUSE as i32)) };
    }
    DENY
}

/// A bind of a reserved port, as the programs see it.
#[derive(Clone, Copy)]
struct Bind {
    slot: Slot,
    proto: Proto,
    port: u16,
    family: u8,
    /// The caller's netns cookie if [`decide`] looked it up already, else 0.
    netns: u64,
}

/// Why a bind is refused, for the counters and the event.
#[derive(Clone, Copy)]
struct Refusal {
    reason: u8,
    /// With [`REASON_LIMIT`]: the unit, what it holds, and the limit.
    unit: u64,
    held: u64,
    limit: u32,
}

impl Refusal {
    const fn plain(reason: u8) -> Refusal {
        Refusal {
            reason,
            unit: 0,
            held: 0,
            limit: 0,
        }
    }
}

#[inline(always)]
fn decide(ctx: &SockAddrContext, family: u8) -> i32 {
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let Some(entry) = PG_PORTS.get(port as u32) else {
        return ALLOW;
    };
    if entry.slot == 0 {
        return ALLOW;
    }
    if entry.slot == SLOT_SENTINEL {
        return sentinel_port_bind(ctx, family, port);
    }
    let Some(slot) = Slot::of_entry(entry.slot) else {
        return ALLOW;
    };
    let proto = match sa.protocol {
        IPPROTO_TCP | IPPROTO_MPTCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        _ => return ALLOW,
    };
    if !proto.in_set(entry.protocols) {
        return ALLOW;
    }
    // Read once for the whole decision.
    let config = PG_CONFIG.get(0);
    // Scoped to some namespaces: a bind in any other passes, counted apart.
    let mut netns = 0;
    if config.is_some_and(|c| c.flags & FLAG_NETNS_SCOPED != 0) {
        netns = netns_cookie(ctx);
        if netns != 0 && unsafe { PG_NETNS.get(netns) }.is_none() {
            count_in(&PG_UNGUARDED, slot.proto_index(proto));
            return ALLOW;
        }
    }
    let bind = Bind {
        slot,
        proto,
        port,
        family,
        netns,
    };
    let audit = config.is_some_and(|c| c.mode == MODE_AUDIT);
    let refusal = match unsafe { PG_LEASES.get(port as u32) } {
        // A leased port is an explicit grant: not charged to any share.
        Some(lease) => {
            let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(lease.level as i32) };
            (ancestor != lease.cgroup_id).then_some(Refusal::plain(REASON_LEASED))
        }
        None => {
            let limit = PG_LIMITS.get(slot.index()).copied().unwrap_or(0);
            let unit = allowed_unit(slot, config, limit != 0);
            match (unit != NOT_ALLOWED).then_some(unit) {
                None => Some(Refusal::plain(REASON_NOT_ALLOWED)),
                Some(_) if limit == 0 => None,
                Some(unit) => share(ctx, slot, unit, limit, audit),
            }
        }
    };
    match refusal {
        None => {
            // The allocator's probe binds test the port for its lessee: not a bind to count.
            let sk = unsafe { sa.__bindgen_anon_1.sk };
            if sk.is_null() || unsafe { (*sk).mark } != PROBE_MARK {
                count(slot.counter(proto, COUNTER_ALLOWED));
            }
            ALLOW
        }
        Some(why) => refuse(ctx, config, audit, &bind, &why),
    }
}

/// [`allowed_unit`]'s answer when no allowed cgroup is on the caller's path.
const NOT_ALLOWED: u64 = u64::MAX;

/// [`allowed`] as one value ([`NOT_ALLOWED`] for None), in a function of its own (a BPF-to-BPF
/// call), not inlined: the verifier walks the loop once there and the rest of the program once
/// for its one return value, rather than the rest again after each of the loop's exits
/// (164,537 instructions verified with everything inlined, 63,281 without this one).
#[inline(never)]
fn allowed_unit(slot: Slot, config: Option<&GuardConfig>, want_unit: bool) -> u64 {
    allowed(slot, config, want_unit).unwrap_or(NOT_ALLOWED)
}

/// Whether an allowed cgroup for range `slot` is on the caller's path (the caller's own cgroup
/// or an ancestor at a level up to [`MAX_CGROUP_LEVEL`], which bounds what the verifier walks;
/// the shallowest counts), and with `want_unit` the unit the caller binds as:
/// that cgroup's child on the path, or the allowed cgroup itself for its own processes (0
/// without `want_unit`). The unit is computed inside the loop, so that what follows sees one
/// value the verifier knows nothing of rather than a constant level per loop exit.
#[inline(always)]
fn allowed(slot: Slot, config: Option<&GuardConfig>, want_unit: bool) -> Option<u64> {
    let levels = config?.allowed_levels;
    let bit = slot.bit();
    let mut level = 0u32;
    while level <= MAX_CGROUP_LEVEL {
        if levels >> level == 0 {
            break;
        }
        if levels & (1u64 << level) != 0 {
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id == 0 {
                // The caller is shallower than `level`: nothing deeper can match.
                break;
            }
            if let Some(mask) = unsafe { PG_ALLOWED.get(id) } {
                if mask & bit != 0 {
                    if !want_unit {
                        return Some(0);
                    }
                    // 0 when the caller is in the allowed cgroup itself.
                    let below =
                        unsafe { bpf_get_current_ancestor_cgroup_id(level as i32 + 1) };
                    return Some(if below != 0 { below } else { id });
                }
            }
        }
        level += 1;
    }
    None
}

/// `*counter += delta` as one atomic instruction (BPF_XADD: every kernel; its old value is never
/// read, which would need 5.12's BPF_FETCH).
#[inline(always)]
fn add(counter: *mut u64, delta: u64) {
    // SAFETY: `counter` points into a map value the verifier checked.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta)
    };
}

/// The share of range `slot` that the caller's `unit` holds, charged with this bind's socket:
/// None when the bind may go on (within `limit`: the socket is now charged), or the refusal
/// when the unit holds the limit already.
///
/// The count is added first and read back, and the bind is refused (its one taken back) when the
/// sum went over the limit: of concurrent binds of one unit, at most the limit ever pass, however
/// many CPUs race. A race can refuse a bind that a closing socket would have made room for; it
/// never lets one more through. The socket stays charged until it is released (or binds again
/// after a failed bind, elsewhere): whether this bind then succeeds is the kernel's to say after
/// the program, and a socket that failed to bind holds its share until it is closed.
#[inline(always)]
fn share(ctx: &SockAddrContext, slot: Slot, unit: u64, limit: u32, audit: bool) -> Option<Refusal> {
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() || unsafe { (*sk).src_port } != 0 {
        // Bound already: the kernel refuses this bind itself (EINVAL), and its socket holds
        // what it was charged for.
        return None;
    }
    let key = ShareKey {
        unit,
        slot: slot.index(),
        _pad: 0,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Some(old) = unsafe { PG_CHARGES.get(&cookie) } {
        let old = *old;
        if old == key {
            // Charged by an earlier bind of this socket that failed: still counted.
            return None;
        }
        forget_charge(cookie, &old);
    }
    let over = |held: u64| {
        Some(Refusal {
            reason: REASON_LIMIT,
            unit,
            held,
            limit,
        })
    };
    if PG_SHARES.get_ptr_mut(&key).is_none() {
        // First socket of this unit in this range (another CPU may win the insert: fine).
        let _ = PG_SHARES.insert(&key, &0, BPF_NOEXIST as u64);
    }
    let Some(count) = PG_SHARES.get_ptr_mut(&key) else {
        // No room to count it: refused rather than uncounted.
        return over(0);
    };
    add(count, 1);
    let held = unsafe { core::ptr::read_volatile(count) };
    let within = held <= u64::from(limit);
    if !within && !audit {
        add(count, u64::MAX);
        return over(held - 1);
    }
    if PG_CHARGES
        .insert(&cookie, &key, BPF_NOEXIST as u64)
        .is_err()
    {
        // No room to remember the socket, so it could never be uncharged: not counted, and
        // refused.
        add(count, u64::MAX);
        return if audit && within {
            None
        } else {
            over(held - 1)
        };
    }
    if let Some(n) = PG_ALLOC.get_ptr_mut(ALLOC_CHARGED as u32) {
        add(n, 1);
    }
    // In audit mode a bind over the limit goes on, charged: the counts stay true.
    if within {
        None
    } else {
        over(held - 1)
    }
}

/// Drops the charge of the socket `cookie` (to `key`'s share), if this is the one that removes
/// it: only the remover takes the counts back.
#[inline(always)]
fn forget_charge(cookie: u64, key: &ShareKey) {
    if PG_CHARGES.remove(&cookie).is_ok() {
        uncharge(key);
        if let Some(n) = PG_ALLOC.get_ptr_mut(ALLOC_CHARGED as u32) {
            add(n, u64::MAX);
        }
    }
}

/// Takes back one socket of `key`'s share.
#[inline(always)]
fn uncharge(key: &ShareKey) {
    if let Some(count) = PG_SHARES.get_ptr_mut(key) {
        add(count, u64::MAX);
    }
}

/// What a refused bind gets.
struct Answer {
    /// The errno the caller gets (or in audit mode would get).
    errno: u32,
    /// Rewrite the bind to this sentinel port, where the kernel's conflict check answers
    /// EADDRINUSE; 0: no rewrite.
    rewrite_to: u32,
    /// Set the errno with `bpf_set_retval` (6.1+).
    set_retval: bool,
}

/// The errno for a refused bind: the configured one where the kernel can set it (6.1+);
/// before that EADDRINUSE through the caller netns's sentinel, where one holds its port; else
/// EPERM.
#[inline(always)]
fn answer(ctx: &SockAddrContext, config: Option<&GuardConfig>, b: &Bind) -> Answer {
    let errno = config.map_or(EPERM, |c| c.errno);
    let configured = unsafe { core::ptr::read_volatile(&SENTINEL_PORT) };
    if configured != 0 && errno == EADDRINUSE {
        let netns = if b.netns != 0 {
            b.netns
        } else {
            netns_cookie(ctx)
        };
        let sentinel = sentinel_of(netns, configured);
        // The post_bind programs make sure the rewritten bind fails even if that sentinel is
        // gone by the time the kernel looks.
        if sentinel_present(ctx, b.family, sentinel) {
            return Answer {
                errno: EADDRINUSE,
                rewrite_to: sentinel,
                set_retval: false,
            };
        }
    }
    if unsafe { core::ptr::read_volatile(&USE_RETVAL) } != 0 {
        Answer {
            errno,
            rewrite_to: 0,
            set_retval: errno != EPERM,
        }
    } else {
        Answer {
            errno: EPERM,
            rewrite_to: 0,
            set_retval: false,
        }
    }
}

/// A refused (in audit mode, would-be-refused) bind: counted, reported, answered. Not inlined,
/// for the verifier as [`allowed_unit`]: the refusals of every reason reach it through one call
/// (63,281 instructions verified inlined, 47,231 not).
#[inline(never)]
fn refuse(
    ctx: &SockAddrContext,
    config: Option<&GuardConfig>,
    audit: bool,
    b: &Bind,
    why: &Refusal,
) -> i32 {
    let answer = answer(ctx, config, b);
    count(b.slot.counter(
        b.proto,
        if audit {
            COUNTER_AUDITED
        } else {
            COUNTER_DENIED
        },
    ));
    if u32::from(why.reason) < REASONS {
        count_in(&PG_REASONS, b.slot.reason_index(b.proto, why.reason));
    }
    report(ctx, b, why, answer.errno, audit);
    // Only with `daemon -v`: the agent loads with AYA_LOG_LEVEL below debug otherwise, and the
    // record is never written.
    debug!(
        ctx,
        "refused bind: port {} proto {} family {} reason {} audit {}",
        b.port,
        b.proto.bit(),
        b.family,
        why.reason,
        audit as u8
    );
    if audit {
        return ALLOW;
    }
    if answer.rewrite_to != 0 {
        // user_port holds the port in network byte order.
        unsafe { (*ctx.sock_addr).user_port = u32::from((answer.rewrite_to as u16).to_be()) };
        return ALLOW;
    }
    if answer.set_retval {
        // Minimum kernel version 6.1 for sock_addr programs; pruned on older kernels.
        unsafe { bpf_set_retval(-(answer.errno as i32)) };
    }
    DENY
}

/// What an offender's entry remembers of its last denial, for the agent's summary.
struct Last {
    cgroup: u64,
    uid: u32,
    tgid: u32,
    port: u16,
    protocol: u8,
    family: u8,
    comm: [u8; 16],
    errno: u32,
    action: u8,
    reason: u8,
}

/// Reports a refusal: an event through the ring buffer while its offender has credit
/// ([`has_credit`]), else only the counts the agent's summary reads.
#[inline(always)]
fn report(ctx: &SockAddrContext, b: &Bind, why: &Refusal, errno: u32, audit: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid = bpf_get_current_uid_gid() as u32;
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let last = Last {
        cgroup,
        uid,
        tgid: (pid_tgid >> 32) as u32,
        port: b.port,
        protocol: b.proto.bit() as u8,
        family: b.family,
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        errno,
        action: if audit { ACTION_AUDITED } else { ACTION_DENIED },
        reason: why.reason,
    };
    let key = budget_key(uid, cgroup);
    if uid != 0 {
        count_cgroup(cgroup, uid);
    }
    if !has_credit(key, &last) {
        return;
    }
    let Some(mut entry) = PG_EVENTS.reserve::<DenialEvent>(0) else {
        // The agent is not reading fast enough: the denial is counted, its event is lost, and
        // the agent says how many.
        count(EVENTS_LOST_INDEX);
        return;
    };
    entry.write(DenialEvent {
        cgroup_id: cgroup,
        pid: pid_tgid as u32,
        tgid: last.tgid,
        port: b.port,
        protocol: last.protocol,
        family: b.family,
        action: last.action,
        reason: why.reason,
        held: why.held.min(u64::from(u16::MAX)) as u16,
        errno,
        comm: last.comm,
        netns_cookie: if b.netns != 0 {
            b.netns
        } else {
            netns_cookie(ctx)
        },
        unit_id: why.unit,
        time_ns: unsafe { bpf_ktime_get_boot_ns() },
        uid,
        limit: why.limit,
    });
    entry.submit(0);
    // Counted as reported only once it is on its way: a lost event stays in the summary.
    if let Some(o) = PG_BUDGET.get_ptr_mut(&key) {
        unsafe { (*o).reported += 1 };
    }
}

/// Whether this denial gets an event: an offender's first denial always does; after that one per
/// [`EVENT_COST_NS`] of credit, saved up to [`EVENT_CREDIT_MAX_NS`]. The offender is the uid of
/// the refused process, or for root's processes its cgroup (`budget_key`): a user's cgroups share
/// one budget, so making cgroups buys no events. The rest are counted in its entry for the
/// agent's summary. One lookup (and on a first denial one insert) in an LRU map shared by all
/// CPUs, updated with plain stores: threads refusing on several CPUs at once may let an extra
/// event through and lose a few counts of the summary. The counters in PG_COUNTERS stay exact.
#[inline(always)]
fn has_credit(key: u64, last: &Last) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    match PG_BUDGET.get_ptr_mut(&key) {
        Some(o) => {
            let o = unsafe { &mut *o };
            let elapsed = now.wrapping_sub(o.last_ns);
            let credit = if elapsed >= EVENT_CREDIT_MAX_NS {
                EVENT_CREDIT_MAX_NS
            } else {
                let c = o.credit_ns + elapsed;
                if c > EVENT_CREDIT_MAX_NS {
                    EVENT_CREDIT_MAX_NS
                } else {
                    c
                }
            };
            let emit = credit >= EVENT_COST_NS;
            o.credit_ns = if emit { credit - EVENT_COST_NS } else { credit };
            o.last_ns = now;
            o.denials += 1;
            remember(o, last);
            emit
        }
        None => {
            let mut first = Offender {
                credit_ns: EVENT_CREDIT_MAX_NS - EVENT_COST_NS,
                last_ns: now,
                denials: 1,
                ..Offender::default()
            };
            remember(&mut first, last);
            count_in(&PG_STATS, STAT_BUDGET_NEW);
            // Not inserted (the map is being changed concurrently): report anyway.
            let _ = PG_BUDGET.insert(&key, &first, 0);
            true
        }
    }
}

#[inline(always)]
fn remember(o: &mut Offender, last: &Last) {
    o.last_cgroup = last.cgroup;
    o.uid = last.uid;
    o.last_tgid = last.tgid;
    o.last_port = last.port;
    o.last_protocol = last.protocol;
    o.last_family = last.family;
    o.last_comm = last.comm;
    o.last_errno = last.errno;
    o.last_action = last.action;
    o.last_reason = last.reason;
}

/// One more refusal of a non-root user's cgroup, for the per-uid summary's breakdown.
#[inline(always)]
fn count_cgroup(cgroup: u64, uid: u32) {
    match PG_CG_DENIALS.get_ptr_mut(&cgroup) {
        Some(c) => unsafe { (*c).denials += 1 },
        None => {
            count_in(&PG_STATS, STAT_CGROUP_NEW);
            let _ = PG_CG_DENIALS.insert(
                &cgroup,
                &CgroupDenials {
                    denials: 1,
                    uid,
                    _pad: 0,
                },
                0,
            );
        }
    }
}

#[inline(always)]
fn count(index: u32) {
    count_in(&PG_COUNTERS, index)
}

#[inline(always)]
fn count_in(map: &PerCpuArray<u64>, index: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// The licence the kernel reads when it loads the programs: GPL-compatible, as it requires of
/// a program calling its GPL-only helpers (the source is MIT OR GPL-2.0-only, see the README).
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
