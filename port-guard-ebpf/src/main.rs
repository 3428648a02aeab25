//! The guard: `cgroup/bind4` and `cgroup/bind6` programs that refuse reserved ports.
//!
//! Both hooks call [`decide`]. The common bind (port not reserved) costs one array lookup. A
//! reserved port in a network namespace the guard does not enforce in passes at once (one
//! helper call and one hash lookup, when the guard is scoped to some namespaces). A reserved
//! port is then checked against its lease (one helper call: the caller's ancestor at the
//! lessee's level) or, unleased, against the allowed cgroups of its range (one hash lookup per
//! level that holds an allowed cgroup). Everything else is refused: counted, reported through the
//! ring buffer while the offending cgroup has event credit ([`report`]), and, in enforce mode,
//! answered with the configured errno.
//!
//! # Minimum kernel version
//! 5.8 (ring buffer; cgroup bpf_link needs 5.7). `bpf_set_retval` for sock_addr hooks needs 6.1:
//! the agent probes for it and loads with `USE_RETVAL = 0` on older kernels, where a refused bind
//! gets EPERM.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval, bpf_sk_lookup_udp,
            bpf_sk_release,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::debug;
use port_guard_common::{
    counter_index, DenialEvent, GuardConfig, Lease, Offender, PortEntry, RangeDef, ACTION_AUDITED,
    ACTION_DENIED, ALLOC_ENTRIES, BPF_F_MMAPABLE, COUNTERS_LEN, COUNTER_ALLOWED, COUNTER_AUDITED,
    COUNTER_DENIED, EVENTS_BYTES, EVENTS_LOST_INDEX, EVENT_COST_NS, EVENT_CREDIT_MAX_NS,
    FLAG_NETNS_SCOPED, MAX_ALLOWED, MAX_CGROUP_LEVEL, MAX_LEASES, MAX_NETNS, MAX_OFFENDERS,
    MAX_RANGES, MAX_SENTINELS, MODE_AUDIT, PROBE_MARK, PROTO_TCP, PROTO_UDP, SENTINEL_MARK,
    UNGUARDED_LEN,
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

/// Set by the agent at load time: the sentinel port (host order), or 0 when refusals do not go
/// through it (port_guard_common::GLOBAL_SENTINEL_PORT).
#[no_mangle]
static SENTINEL_PORT: u32 = 0;

// The map names below must match port_guard_common::MAP_*: they are the pin file names.
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

/// The agent's record of where its sentinels hold the port (for `status`); declared here so it
/// is created and pinned with the others. The programs look the sentinel up themselves.
#[map(name = "PG_SENT_NETNS")]
static PG_SENT_NETNS: HashMap<u64, u32> = HashMap::pinned(MAX_NETNS, 0);

#[map(name = "PG_OFFENDERS")]
static PG_OFFENDERS: LruHashMap<u64, Offender> = LruHashMap::pinned(MAX_OFFENDERS, 0);

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

/// Keeps the sentinel port for the sentinels: a bind that ends on it from any other socket
/// fails with EPERM. Above all, a refused bind that [`refuse`] rewrote to the sentinel port
/// fails here when no sentinel held the port (the daemon stopped without handing its sockets to
/// the service manager, or the netns has none): it never succeeds on another port.
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
    let sentinel = unsafe { core::ptr::read_volatile(&SENTINEL_PORT) };
    // src_port is in host byte order here.
    if sentinel == 0 || unsafe { (*ctx.sock).src_port } != sentinel {
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    if unsafe { PG_SENTINELS.get(&cookie) }.is_some() {
        ALLOW
    } else {
        DENY
    }
}

/// The cookie of the caller's netns, or 0 where the kernel cannot tell.
#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    if unsafe { core::ptr::read_volatile(&USE_NETNS) } == 0 {
        return 0;
    }
    unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }
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

/// A bind to the sentinel port itself: the sentinels' own pass; any other answers as the port
/// is (taken by the sentinel: EADDRINUSE), or EPERM when no sentinel holds it, so that nobody
/// can take it from the daemon between two of its runs.
#[inline(always)]
fn sentinel_port_bind(ctx: &SockAddrContext, family: u8, port: u32) -> i32 {
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if !sk.is_null() && unsafe { (*sk).mark } == SENTINEL_MARK {
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

#[inline(always)]
fn decide(ctx: &SockAddrContext, family: u8) -> i32 {
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let sentinel = unsafe { core::ptr::read_volatile(&SENTINEL_PORT) };
    if sentinel != 0 && u32::from(port) == sentinel {
        return sentinel_port_bind(ctx, family, sentinel);
    }
    let Some(entry) = PG_PORTS.get(port as u32) else {
        return ALLOW;
    };
    if entry.slot == 0 {
        return ALLOW;
    }
    let (proto_bit, proto_idx) = match sa.protocol {
        IPPROTO_TCP | IPPROTO_MPTCP => (PROTO_TCP, 0),
        IPPROTO_UDP => (PROTO_UDP, 1),
        _ => return ALLOW,
    };
    if entry.protocols & proto_bit == 0 {
        return ALLOW;
    }
    let slot = (entry.slot - 1) as u32;
    // Read once for the whole decision.
    let config = PG_CONFIG.get(0);
    // Scoped to some namespaces: a bind in any other passes, counted apart.
    let mut cookie = 0;
    if config.is_some_and(|c| c.flags & FLAG_NETNS_SCOPED != 0) {
        cookie = netns_cookie(ctx);
        if cookie != 0 && unsafe { PG_NETNS.get(cookie) }.is_none() {
            if let Some(c) = PG_UNGUARDED.get_ptr_mut(slot * 2 + proto_idx) {
                unsafe { *c += 1 };
            }
            return ALLOW;
        }
    }

    let lease = unsafe { PG_LEASES.get(port as u32) };
    let leased = lease.is_some();
    let permitted = match lease {
        Some(lease) => {
            let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(lease.level as i32) };
            ancestor == lease.cgroup_id
        }
        None => allowed_by_range(slot, config),
    };
    if permitted {
        // The allocator's probe binds test the port for its lessee: not a bind to count.
        let sk = unsafe { sa.__bindgen_anon_1.sk };
        if sk.is_null() || unsafe { (*sk).mark } != PROBE_MARK {
            count(slot, proto_idx, COUNTER_ALLOWED);
        }
        return ALLOW;
    }
    let refused = Refused {
        slot,
        proto_idx,
        port,
        protocol: proto_bit as u8,
        family,
        leased,
        cookie,
    };
    refuse(ctx, config, &refused)
}

/// What [`refuse`] reports.
struct Refused {
    slot: u32,
    proto_idx: u32,
    port: u16,
    protocol: u8,
    family: u8,
    leased: bool,
    /// The caller's netns cookie if [`decide`] looked it up already, else 0.
    cookie: u64,
}

/// Whether the caller's cgroup or one of its ancestors is allowed for range `slot`.
#[inline(always)]
fn allowed_by_range(slot: u32, config: Option<&GuardConfig>) -> bool {
    let levels = match config {
        Some(c) => c.allowed_levels,
        None => return false,
    };
    let bit = 1u64 << slot;
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
                    return true;
                }
            }
        }
        level += 1;
    }
    false
}

#[inline(always)]
fn refuse(ctx: &SockAddrContext, config: Option<&GuardConfig>, r: &Refused) -> i32 {
    let Refused {
        slot,
        proto_idx,
        port,
        protocol,
        family,
        leased,
        cookie,
    } = *r;
    let (audit, errno) = match config {
        Some(c) => (c.mode == MODE_AUDIT, c.errno),
        None => (false, EPERM),
    };
    let use_retval = unsafe { core::ptr::read_volatile(&USE_RETVAL) } != 0;
    // Without bpf_set_retval, EADDRINUSE comes from the kernel itself: the bind is rewritten to
    // the sentinel port, which a sentinel of this netns holds (the post_bind programs make sure
    // it fails even if that sentinel is gone by the time the kernel looks).
    let sentinel = unsafe { core::ptr::read_volatile(&SENTINEL_PORT) };
    let rewrite =
        !audit && sentinel != 0 && errno == EADDRINUSE && sentinel_present(ctx, family, sentinel);
    let errno = if audit {
        0
    } else if rewrite {
        EADDRINUSE
    } else if use_retval {
        errno
    } else {
        EPERM
    };
    count(
        slot,
        proto_idx,
        if audit {
            COUNTER_AUDITED
        } else {
            COUNTER_DENIED
        },
    );
    let pid_tgid = bpf_get_current_pid_tgid();
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    let action = if audit { ACTION_AUDITED } else { ACTION_DENIED };
    let last = Last {
        tgid: (pid_tgid >> 32) as u32,
        port,
        protocol,
        family,
        comm,
        errno,
        action,
    };
    if report(cgroup_id, &last) {
        if let Some(mut entry) = PG_EVENTS.reserve::<DenialEvent>(0) {
            entry.write(DenialEvent {
                cgroup_id,
                pid: pid_tgid as u32,
                tgid: (pid_tgid >> 32) as u32,
                port,
                protocol,
                family,
                action,
                leased: leased as u8,
                _pad: [0; 2],
                errno,
                comm,
                netns_cookie: if cookie != 0 {
                    cookie
                } else {
                    netns_cookie(ctx)
                },
            });
            entry.submit(0);
            // Counted as reported only once it is on its way: a lost event stays in the
            // offender's summary.
            if let Some(o) = PG_OFFENDERS.get_ptr_mut(&cgroup_id) {
                unsafe { (*o).reported += 1 };
            }
        } else {
            // The agent is not reading fast enough: the denial is counted above, its event is
            // lost, and the agent says how many.
            count_at(EVENTS_LOST_INDEX);
        }
    }
    // Only with `daemon -v`: the agent loads with AYA_LOG_LEVEL below debug otherwise, and the
    // record is never written.
    debug!(
        ctx,
        "refused bind: port {} proto {} family {} leased {} audit {}",
        port,
        protocol,
        family,
        leased as u8,
        audit as u8
    );
    if audit {
        return ALLOW;
    }
    if rewrite {
        // user_port holds the port in network byte order.
        unsafe { (*ctx.sock_addr).user_port = u32::from((sentinel as u16).to_be()) };
        return ALLOW;
    }
    if use_retval && errno != EPERM {
        // Minimum kernel version 6.1 for sock_addr programs; pruned on older kernels.
        unsafe { bpf_set_retval(-(errno as i32)) };
    }
    DENY
}

/// What an offender's entry remembers of its last denial, for the agent's summary.
struct Last {
    tgid: u32,
    port: u16,
    protocol: u8,
    family: u8,
    comm: [u8; 16],
    errno: u32,
    action: u8,
}

/// Whether this denial gets an event: the offending cgroup's first denial (on this CPU) always
/// does; after that one per [`EVENT_COST_NS`] of credit, saved up to [`EVENT_CREDIT_MAX_NS`]. The
/// rest are counted in its entry for the agent's summary. One lookup (and on a first denial one
/// insert) in an LRU map shared by all CPUs, updated with plain stores (this target has no atomic
/// add): threads of one cgroup refusing on several CPUs at once may let an extra event through
/// and lose a few counts of its summary. The counters in PG_COUNTERS stay exact.
#[inline(always)]
fn report(cgroup_id: u64, last: &Last) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    match PG_OFFENDERS.get_ptr_mut(&cgroup_id) {
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
            o.last_tgid = last.tgid;
            o.last_port = last.port;
            o.last_protocol = last.protocol;
            o.last_family = last.family;
            o.last_comm = last.comm;
            o.last_errno = last.errno;
            o.last_action = last.action;
            emit
        }
        None => {
            let first = Offender {
                credit_ns: EVENT_CREDIT_MAX_NS - EVENT_COST_NS,
                last_ns: now,
                denials: 1,
                reported: 0,
                last_tgid: last.tgid,
                last_port: last.port,
                last_protocol: last.protocol,
                last_family: last.family,
                last_comm: last.comm,
                last_errno: last.errno,
                last_action: last.action,
                _pad: [0; 3],
            };
            // Not inserted (the map is being changed concurrently): report anyway.
            let _ = PG_OFFENDERS.insert(&cgroup_id, &first, 0);
            true
        }
    }
}

#[inline(always)]
fn count(slot: u32, proto_idx: u32, kind: u32) {
    count_at(counter_index(slot, proto_idx, kind))
}

#[inline(always)]
fn count_at(index: u32) {
    if let Some(c) = PG_COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
