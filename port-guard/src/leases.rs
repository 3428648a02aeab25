//! Leases: a port claimed for one cgroup, enforced by the kernel from the instant it exists.
//!
//! Allocation needs no daemon. The caller runs inside the lessee cgroup (spawn moves itself in;
//! `lease --cgroup` forks a child into a scratch cgroup and hands the lease over). It claims a
//! port by inserting `port → cgroup` with BPF_NOEXIST, so the kernel decides any race between
//! allocators, and only then probe-binds the port (tcp on the v6 and v4 wildcards, as libvirt's
//! virPortAllocator does, plus udp where the range covers it): the guard lets the lessee through,
//! and EADDRINUSE means a socket already held the port before the claim, so the claim is dropped
//! and the next port tried. From the claim on, nobody else can bind the port.
//!
//! Candidates come from the leased-port bitmap every allocator shares (`PG_ALLOC`, mmapped):
//! the lowest port not marked is claimed, so an allocation costs one claim and one probe at any
//! fill of the range instead of a read of the whole lease map. The bitmap only proposes; the
//! claim decides, and a claim that fails marks the port.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd as _,
};

use aya::maps::MapError;
use port_guard_common::{Lease, PROTO_UDP};

use crate::{
    cgroup::CgroupPath,
    guard::{now_secs, GuardError, Maps},
    policy::{PortRange, Protocols, ReserveSpec},
};

const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// A lease could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Every port of every range is leased or held.
    #[error("no free port: every port of {ranges} is leased or already bound")]
    Exhausted { ranges: String },
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
    /// A map operation failed.
    #[error(transparent)]
    Guard(#[from] GuardError),
}

impl LeaseError {
    pub fn is_usage(&self) -> bool {
        matches!(self, LeaseError::NotReserved { .. })
    }
}

fn map_err(e: MapError) -> LeaseError {
    LeaseError::Guard(GuardError::Map {
        name: port_guard_common::MAP_LEASES,
        source: Box::new(e),
    })
}

fn is_errno(e: &MapError, errno: i32) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno))
}

/// The ranges, in port order, as `A-B/proto` for messages.
fn describe(ranges: &[ReserveSpec]) -> String {
    if ranges.is_empty() {
        return "no reserved range".into();
    }
    ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The configured ranges from the maps.
pub fn ranges(maps: &Maps) -> Result<Vec<ReserveSpec>, GuardError> {
    let mut v: Vec<ReserveSpec> = maps
        .ranges()?
        .into_values()
        .map(|d| ReserveSpec {
            range: PortRange {
                first: d.first,
                last: d.last,
            },
            protocols: Protocols(d.protocols),
        })
        .collect();
    v.sort_by_key(|s| s.range);
    Ok(v)
}

/// Claims `port` for `cgroup_id` if nobody holds a lease on it. The kernel decides races.
pub fn claim(maps: &mut Maps, port: u16, cgroup_id: u64, level: u32) -> Result<bool, LeaseError> {
    let lease = Lease {
        cgroup_id,
        level,
        _pad: 0,
        since: now_secs(),
    };
    match maps.leases.insert(u32::from(port), lease, BPF_NOEXIST) {
        Ok(()) => {
            maps.alloc.mark(port);
            maps.alloc.bump();
            Ok(true)
        }
        Err(e) if is_errno(&e, libc::EEXIST) => {
            // Leased already; the bitmap may not know yet (a lease of an allocator that died
            // between its claim and its mark).
            maps.alloc.mark(port);
            Ok(false)
        }
        Err(e) => Err(map_err(e)),
    }
}

/// Gives an existing lease to another cgroup in one map update: the port is never unleased.
pub fn hand_over(maps: &mut Maps, port: u16, cgroup_id: u64, level: u32) -> Result<(), LeaseError> {
    let lease = Lease {
        cgroup_id,
        level,
        _pad: 0,
        since: now_secs(),
    };
    maps.leases
        .insert(u32::from(port), lease, BPF_EXIST)
        .map_err(|e| {
            if is_errno(&e, libc::ENOENT) {
                LeaseError::NotLeased(port)
            } else {
                map_err(e)
            }
        })?;
    maps.alloc.bump();
    Ok(())
}

/// Removes the lease on `port`. The lease goes before its bit: an allocator that sees the bit
/// clear finds the port unleased.
pub fn release(maps: &mut Maps, port: u16) -> Result<(), LeaseError> {
    let result = maps.leases.remove(&u32::from(port)).map_err(|e| {
        if is_errno(&e, libc::ENOENT) {
            LeaseError::NotLeased(port)
        } else {
            map_err(e)
        }
    });
    if matches!(result, Ok(()) | Err(LeaseError::NotLeased(_))) {
        maps.alloc.unmark(port);
        maps.alloc.bump();
    }
    result
}

/// Removes every lease of `cgroup_id`; returns the ports.
pub fn release_cgroup(maps: &mut Maps, cgroup_id: u64) -> Result<Vec<u16>, LeaseError> {
    let mut ports = Vec::new();
    for (port, lease) in maps.leases()? {
        if lease.cgroup_id == cgroup_id {
            match release(maps, port as u16) {
                Ok(()) | Err(LeaseError::NotLeased(_)) => ports.push(port as u16),
                Err(e) => return Err(e),
            }
        }
    }
    Ok(ports)
}

/// Whether no socket holds `port` (the caller must be allowed to bind it: the lessee).
/// Sockets use SO_REUSEADDR like qemu's listener, so a TIME_WAIT leftover does not count.
pub fn probe_free(port: u16, protocols: Protocols) -> Result<bool, LeaseError> {
    let probe_err = |source| LeaseError::Probe { port, source };
    if protocols.0 & Protocols::TCP.0 != 0 {
        for addr in [
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        ] {
            match bind_tcp(addr) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => return Ok(false),
                // No IPv6 on this host: the v4 probe decides.
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
                Err(e) => return Err(probe_err(e)),
            }
        }
    }
    if protocols.0 & PROTO_UDP != 0 {
        for addr in [
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        ] {
            match UdpSocket::bind(addr) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => return Ok(false),
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
                Err(e) => return Err(probe_err(e)),
            }
        }
    }
    Ok(true)
}

/// Binds (without listening) a TCP socket with SO_REUSEADDR, and IPV6_V6ONLY for v6 so the two
/// wildcards are probed separately, as virPortAllocatorBindToPort does.
fn bind_tcp(addr: SocketAddr) -> io::Result<()> {
    let (domain, v6) = match addr {
        SocketAddr::V4(_) => (libc::AF_INET, false),
        SocketAddr::V6(_) => (libc::AF_INET6, true),
    };
    // SAFETY: plain socket syscalls on an fd owned by the TcpListener wrapper below.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let setopt = |level, name| {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        setopt(libc::SOL_SOCKET, libc::SO_REUSEADDR);
        if v6 {
            setopt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY);
        }
        let r = match addr {
            SocketAddr::V4(a) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                libc::bind(
                    sock.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            }
            SocketAddr::V6(a) => {
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                libc::bind(
                    sock.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in6).cast(),
                    size_of::<libc::sockaddr_in6>() as u32,
                )
            }
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Leases a port to `cgroup_id` (at `level`), which must be the caller's own cgroup: `requested`
/// or the first free port of the ranges, in port order. The outcome is left for the daemon's
/// metrics.
pub fn allocate(
    maps: &mut Maps,
    cgroup_id: u64,
    level: u32,
    requested: Option<u16>,
) -> Result<u16, LeaseError> {
    let result = allocate_inner(maps, cgroup_id, level, requested);
    match &result {
        Ok(_) => maps.alloc.record(true),
        Err(LeaseError::Exhausted { .. }) => maps.alloc.record(false),
        Err(_) => {}
    }
    result
}

fn allocate_inner(
    maps: &mut Maps,
    cgroup_id: u64,
    level: u32,
    requested: Option<u16>,
) -> Result<u16, LeaseError> {
    let ranges = ranges(maps)?;
    if let Some(port) = requested {
        let Some(spec) = ranges.iter().find(|s| s.range.contains(port)) else {
            return Err(LeaseError::NotReserved {
                port,
                ranges: describe(&ranges),
            });
        };
        if !claim(maps, port, cgroup_id, level)? {
            let holder = maps
                .leases
                .get(&u32::from(port), 0)
                .map(|l| {
                    crate::cgroup::Cgroup2::find()
                        .ok()
                        .and_then(|cg| crate::guard::CgroupNames::new(&cg).lookup(l.cgroup_id))
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| format!("cgroup id {}", l.cgroup_id))
                })
                .unwrap_or_else(|_| "another cgroup".into());
            return Err(LeaseError::Leased { port, holder });
        }
        return match probe_free(port, spec.protocols) {
            Ok(true) => Ok(port),
            Ok(false) => {
                release(maps, port)?;
                Err(LeaseError::InUse { port })
            }
            Err(e) => {
                release(maps, port)?;
                Err(e)
            }
        };
    }
    // The lowest port the bitmap shows unleased; the claim decides.
    for spec in &ranges {
        let mut from = spec.range.first;
        while let Some(port) = maps.alloc.first_unmarked(from, spec.range.last) {
            if claim(maps, port, cgroup_id, level)? {
                match probe_free(port, spec.protocols) {
                    Ok(true) => return Ok(port),
                    Ok(false) => release(maps, port)?,
                    Err(e) => {
                        release(maps, port)?;
                        return Err(e);
                    }
                }
            }
            // Leased (another allocator got it first) or held by a socket: the next one.
            match port.checked_add(1) {
                Some(next) => from = next,
                None => break,
            }
        }
    }
    Err(LeaseError::Exhausted {
        ranges: describe(&ranges),
    })
}

/// Whether `path` is a cgroup `spawn` made (directly below the spawn parent).
pub fn is_spawned(path: &CgroupPath, spawn_parent: &CgroupPath) -> bool {
    path.is_within(spawn_parent) && path.level() == spawn_parent.level() + 1
}
