//! The sentinel: how a refused bind gets EADDRINUSE on kernels whose bind programs cannot set
//! an errno (`bpf_set_retval` came to them in 6.1).
//!
//! The daemon holds the sentinel port S in each guarded network namespace with a TCP and a UDP
//! socket on the IPv6 wildcard, dual-stack (the IPv4 wildcard where the host has no IPv6), with
//! neither SO_REUSEADDR nor SO_REUSEPORT: no other bind to S can succeed, whatever address,
//! family or socket option it uses. The bind programs rewrite a refused bind's port to S
//! (only where a socket lookup finds the UDP sentinel, marked [`SENTINEL_MARK`], at that
//! instant), and the kernel's own conflict check answers EADDRINUSE. The post_bind programs refuse any bind that still ends on S from a socket
//! that is not a registered sentinel (`PG_SENTINELS`, by socket cookie), so a rewritten bind
//! never succeeds, even when the sentinel is gone by the time the kernel looks.
//!
//! Under systemd the sockets go to the service manager's fd store (`FDSTORE=1`) and come back
//! through `LISTEN_FDS` when the daemon restarts, so a restart keeps EADDRINUSE throughout.
//! systemd closes a stored fd as soon as it polls POLLHUP or POLLERR, and a TCP socket that is
//! bound but not listening (TCP_CLOSE) polls POLLHUP: so the TCP sentinel listens (backlog 0).
//! Both sockets carry a socket filter that drops every packet, so a connection attempt to S
//! times out (no SYN is answered, nothing waits in an accept queue) and no datagram queues.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use port_guard_common::SENTINEL_MARK;
use socket2::{Domain, Socket, Type};

use crate::sys;

/// Name of the sentinels' fds in the fd store: `pg-sentinel-<netns inode>`.
pub const FDNAME_PREFIX: &str = "pg-sentinel-";

/// One socket of a sentinel, with what identifies it.
#[derive(Debug)]
pub struct SentinelSocket {
    pub socket: Socket,
    /// Its cookie: what the post_bind programs look up.
    pub cookie: u64,
    /// The netns it lives in.
    pub netns_inode: u64,
}

/// Creates the unbound TCP and UDP sockets of a sentinel in the calling thread's netns:
/// dual-stack IPv6, or IPv4 where IPv6 is missing. They must be registered (their cookies in
/// `PG_SENTINELS`) before [`bind`]: the post_bind programs refuse any other bind to the port.
pub fn create() -> io::Result<Vec<SentinelSocket>> {
    let mut out = Vec::new();
    // UDP first: the lower fd, closed first when the process ends. The programs look for the UDP
    // one, so they stop rewriting before the TCP one is gone.
    for ty in [Type::DGRAM, Type::STREAM] {
        let socket = match Socket::new(Domain::IPV6, ty.cloexec(), None) {
            Ok(s) => {
                s.set_only_v6(false)?;
                s
            }
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                Socket::new(Domain::IPV4, ty.cloexec(), None)?
            }
            Err(e) => return Err(e),
        };
        // What the programs recognise a sentinel by; only root (CAP_NET_ADMIN) can set it.
        socket.set_mark(SENTINEL_MARK)?;
        drop_all_packets(&socket)?;
        let cookie = sys::socket_cookie(socket.as_fd())?;
        let netns_inode = sys::socket_netns_inode(socket.as_fd())?;
        out.push(SentinelSocket {
            socket,
            cookie,
            netns_inode,
        });
    }
    Ok(out)
}

/// Binds the sockets of [`create`] to `port` on their wildcard: TCP first, UDP last, because the
/// programs rewrite refusals once they find the UDP one, and the TCP one must be in place by then.
pub fn bind(socks: &[SentinelSocket], port: u16) -> io::Result<()> {
    let mut ordered: Vec<&SentinelSocket> = socks.iter().collect();
    ordered.sort_by_key(|s| s.socket.r#type().ok() == Some(Type::DGRAM));
    for s in ordered {
        let addr = if s.socket.domain()? == Domain::IPV6 {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
        };
        s.socket.bind(&addr.into())?;
        if s.socket.r#type()? == Type::STREAM {
            s.socket.listen(0)?;
        }
    }
    Ok(())
}

/// A classic socket filter that accepts nothing (`ret #0`): the sentinel answers no SYN and
/// queues no datagram. The bind conflict, all the sentinel is for, does not look at packets.
fn drop_all_packets(socket: &Socket) -> io::Result<()> {
    const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    socket.attach_filter(&[socket2::SockFilter::new(BPF_RET_K, 0, 0, 0)])
}

/// A sentinel socket handed back by the service manager: bound to a port `port_ok` accepts (the
/// configured sentinel port, or one a sentinel took in its place), TCP or UDP on a wildcard,
/// marked, without SO_REUSEADDR/SO_REUSEPORT. Anything else is not one of ours (None). Returns
/// the socket and its port.
pub fn adopt(fd: OwnedFd, port_ok: impl Fn(u16) -> bool) -> Option<(SentinelSocket, u16)> {
    let socket = Socket::from(fd);
    let local = socket.local_addr().ok()?.as_socket()?;
    let ty = socket.r#type().ok()?;
    if !port_ok(local.port())
        || !local.ip().is_unspecified()
        || !(ty == Type::STREAM || ty == Type::DGRAM)
        || socket.reuse_address().ok()?
        || socket.reuse_port().ok()?
        || socket.mark().ok()? != SENTINEL_MARK
    {
        return None;
    }
    socket.set_cloexec(true).ok()?;
    // A TCP sentinel that does not listen would be closed by the fd store at the next hand-over
    // (one of an older daemon); listen() again on a listening one only sets its backlog.
    drop_all_packets(&socket).ok()?;
    if ty == Type::STREAM {
        socket.listen(0).ok()?;
    }
    Some((
        SentinelSocket {
            cookie: sys::socket_cookie(socket.as_fd()).ok()?,
            netns_inode: sys::socket_netns_inode(socket.as_fd()).ok()?,
            socket,
        },
        local.port(),
    ))
}

/// The fds the service manager passed this process (`LISTEN_FDS`, for this pid), with their
/// names (`LISTEN_FDNAMES`). The variables are removed so that children do not see them.
pub fn inherited_fds() -> Vec<(String, OwnedFd)> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    // SAFETY: single-threaded start-up, before any thread reads the environment.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if !pid_ok || count <= 0 {
        return Vec::new();
    }
    let mut names = names.split(':');
    (0..count)
        .map(|i| {
            let fd = 3 + i;
            // SAFETY: sd_listen_fds(3): fds 3.. are passed to this process and owned by it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: FD_CLOEXEC on a valid fd: children must not inherit it.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            (names.next().unwrap_or("").to_owned(), fd)
        })
        .collect()
}
