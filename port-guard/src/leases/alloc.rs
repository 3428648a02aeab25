//! Allocation: finding a free port and making it the caller's.
//!
//! Allocation needs no daemon. The caller runs inside the lessee cgroup (spawn moves itself in;
//! `lease --cgroup` moves into a scratch cgroup and hands the lease over). It claims a port by
//! inserting `port → cgroup` with BPF_NOEXIST, so the kernel decides any race between
//! allocators, and only then probe-binds the port (tcp on the v6 and v4 wildcards, as libvirt's
//! virPortAllocator does, plus udp where the range covers it): the guard lets the lessee through,
//! and EADDRINUSE means a socket already held the port before the claim, so the claim is dropped
//! and the next port tried. From the claim on, nobody else can bind the port.
//!
//! Candidates come from the leased-port bitmap every allocator shares: the lowest port not
//! marked is claimed, so an allocation costs one claim and one probe at any fill of the range.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use port_guard_common::{Proto, PROBE_MARK};
use socket2::{Domain, Socket, Type};

use super::{Holder, LeaseError, LeaseTable};
use crate::{
    cgroup::{Cgroup2, CgroupNames},
    netns::{ProbeError, ProbeIn},
    policy::{Protocols, ReserveSpec},
};

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

/// Whether no socket holds `port` (the caller must be allowed to bind it: the lessee).
/// Sockets use SO_REUSEADDR like qemu's listener, so a TIME_WAIT leftover does not count.
pub fn probe_free(port: u16, protocols: Protocols) -> Result<bool, LeaseError> {
    let probe_err = |source| LeaseError::Probe { port, source };
    let wildcards = [
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
    ];
    for proto in Proto::ALL.into_iter().filter(|p| p.in_set(protocols.0)) {
        let ty = match proto {
            Proto::Tcp => Type::STREAM,
            Proto::Udp => Type::DGRAM,
        };
        for addr in wildcards {
            match probe_bind(addr, ty) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => return Ok(false),
                // No IPv6 on this host: the v4 probe decides.
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
                Err(e) => return Err(probe_err(e)),
            }
        }
    }
    Ok(true)
}

/// Binds (without listening) a socket. TCP as virPortAllocatorBindToPort does: SO_REUSEADDR,
/// and IPV6_V6ONLY for v6 so the two wildcards are probed separately. UDP plainly.
fn probe_bind(addr: SocketAddr, ty: Type) -> io::Result<()> {
    let sock = Socket::new(Domain::for_address(addr), ty.cloexec(), None)?;
    // Marked so that the guard does not count the probe as an allowed bind. Without
    // CAP_NET_ADMIN it is counted: nothing else changes.
    let _ = sock.set_mark(PROBE_MARK);
    if ty == Type::STREAM {
        sock.set_reuse_address(true)?;
        if addr.is_ipv6() {
            sock.set_only_v6(true)?;
        }
    }
    sock.bind(&addr.into())
}

/// Leases a port of `ranges` to `holder`, whose cgroup must be the caller's own: `requested`,
/// or the first free port of the ranges in port order, free in every netns of `probe_in`. The
/// outcome is counted for the daemon's metrics.
pub fn allocate(
    ranges: &[ReserveSpec],
    table: &mut LeaseTable,
    holder: Holder,
    requested: Option<u16>,
    probe_in: &ProbeIn,
) -> Result<u16, LeaseError> {
    let result = allocate_inner(ranges, table, holder, requested, probe_in);
    match &result {
        Ok(_) => table.record(1),
        Err(LeaseError::Exhausted { .. }) => table.record(0),
        Err(_) => {}
    }
    result
}

/// Leases `count` ports of `ranges` to `holder` (the caller's own cgroup), all or nothing: the
/// lowest free ones, in port order. When fewer are free, or anything fails, the ports claimed so
/// far are released before the error returns. Counted as one request of `count` ports, or one
/// exhaustion.
pub fn allocate_many(
    ranges: &[ReserveSpec],
    table: &mut LeaseTable,
    holder: Holder,
    count: usize,
    probe_in: &ProbeIn,
) -> Result<Vec<u16>, LeaseError> {
    let mut got: Vec<u16> = Vec::with_capacity(count);
    while got.len() < count {
        match allocate_inner(ranges, table, holder, None, probe_in) {
            Ok(port) => got.push(port),
            Err(e) => {
                for port in &got {
                    let _ = table.release(*port);
                }
                return Err(match e {
                    LeaseError::Exhausted { ranges } if got.is_empty() => {
                        table.record(0);
                        LeaseError::Exhausted { ranges }
                    }
                    LeaseError::Exhausted { ranges } => {
                        table.record(0);
                        LeaseError::TooFew {
                            wanted: count,
                            found: got.len(),
                            ranges,
                        }
                    }
                    e => e,
                });
            }
        }
    }
    table.record(got.len() as u64);
    got.sort_unstable();
    Ok(got)
}

/// Keeps the claim of `port` if the probe finds it free; drops it otherwise.
fn probe_claimed(
    table: &mut LeaseTable,
    port: u16,
    protocols: Protocols,
    probe_in: &ProbeIn,
) -> Result<bool, LeaseError> {
    let free = probe_in
        .all_free(|| probe_free(port, protocols))
        .map_err(|e| match e {
            ProbeError::Probe(e) => e,
            ProbeError::Enter(e) => LeaseError::Probe {
                port,
                source: io::Error::other(e.to_string()),
            },
        });
    match free {
        Ok(true) => Ok(true),
        Ok(false) => {
            table.release(port)?;
            Ok(false)
        }
        Err(e) => {
            table.release(port)?;
            Err(e)
        }
    }
}

fn allocate_inner(
    ranges: &[ReserveSpec],
    table: &mut LeaseTable,
    holder: Holder,
    requested: Option<u16>,
    probe_in: &ProbeIn,
) -> Result<u16, LeaseError> {
    if let Some(port) = requested {
        let Some(spec) = ranges.iter().find(|s| s.range.contains(port)) else {
            return Err(LeaseError::NotReserved {
                port,
                ranges: describe(ranges),
            });
        };
        if !table.claim(port, holder)? {
            let holder = match table.get(port) {
                Ok(Some(l)) => Cgroup2::find()
                    .ok()
                    .and_then(|cg| CgroupNames::new(&cg).lookup(l.cgroup_id).ok().flatten())
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| format!("cgroup id {}", l.cgroup_id)),
                _ => "another cgroup".into(),
            };
            return Err(LeaseError::Leased { port, holder });
        }
        return if probe_claimed(table, port, spec.protocols, probe_in)? {
            Ok(port)
        } else {
            Err(LeaseError::InUse { port })
        };
    }
    // The lowest port the bitmap shows unleased; the claim decides.
    for spec in ranges {
        let mut from = spec.range.first;
        while let Some(port) = table.first_unmarked(from, spec.range.last) {
            if table.claim(port, holder)? && probe_claimed(table, port, spec.protocols, probe_in)? {
                return Ok(port);
            }
            // Leased (another allocator got it first) or held by a socket: the next one.
            match port.checked_add(1) {
                Some(next) => from = next,
                None => break,
            }
        }
    }
    Err(LeaseError::Exhausted {
        ranges: describe(ranges),
    })
}
