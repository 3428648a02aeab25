//! Raw TCP sockets for the test helper binaries (pg-allocator, pg-hostile, pg-sockets): the
//! exact socket options the scenario needs, and which step failed with which errno. Written
//! independently of port-guard's own probe code, which is what the tests check.

use std::{io, net::SocketAddr};

use socket2::{Domain, Socket, Type};

/// Options of [`tcp`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Tcp {
    pub reuseaddr: bool,
    /// IPV6_V6ONLY on IPv6 sockets (ignored for IPv4).
    pub v6only: bool,
    /// listen() with this backlog after the bind.
    pub listen: Option<i32>,
}

/// The step of [`tcp`] that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Socket,
    Bind,
    Listen,
}

/// A TCP socket (SOCK_CLOEXEC) bound to `addr` (and listening with `opts.listen`), or the
/// failed step and its errno (the socket is closed then). Failures to set an option are
/// ignored: the bind that follows is what the scenarios look at.
pub fn tcp(addr: SocketAddr, opts: Tcp) -> Result<Socket, (Step, i32)> {
    let at = |step: Step| move |e: io::Error| (step, e.raw_os_error().unwrap_or_default());
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(at(Step::Socket))?;
    if opts.reuseaddr {
        let _ = s.set_reuse_address(true);
    }
    if addr.is_ipv6() {
        let _ = s.set_only_v6(opts.v6only);
    }
    s.bind(&addr.into()).map_err(at(Step::Bind))?;
    if let Some(backlog) = opts.listen {
        s.listen(backlog).map_err(at(Step::Listen))?;
    }
    Ok(s)
}
