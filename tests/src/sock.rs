//! Raw TCP sockets for the test helper binaries (pg-allocator, pg-hostile, pg-sockets): the
//! exact socket options the scenario needs, and which step failed with which errno. Written
//! independently of port-guard's own probe code, which is what the tests check.

use std::net::SocketAddr;

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

fn errno() -> i32 {
    // SAFETY: reading the thread's errno.
    unsafe { *libc::__errno_location() }
}

/// A TCP socket bound to `addr` (and listening with `opts.listen`): its fd, which the caller
/// owns, or the failed step and its errno (the socket is closed then).
pub fn tcp(addr: SocketAddr, opts: Tcp) -> Result<i32, (Step, i32)> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on an fd this function owns until it returns it.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err((Step::Socket, errno()));
        }
        let set = |level, name, on: bool| {
            let v: libc::c_int = on.into();
            libc::setsockopt(fd, level, name, (&v as *const libc::c_int).cast(), 4);
        };
        if opts.reuseaddr {
            set(libc::SOL_SOCKET, libc::SO_REUSEADDR, true);
        }
        if !addr.is_ipv4() {
            set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, opts.v6only);
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
                    fd,
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
                    sin6_scope_id: a.scope_id(),
                };
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    size_of::<libc::sockaddr_in6>() as u32,
                )
            }
        };
        let failed = if r != 0 {
            Some(Step::Bind)
        } else if opts.listen.is_some_and(|n| libc::listen(fd, n) != 0) {
            Some(Step::Listen)
        } else {
            None
        };
        if let Some(step) = failed {
            let e = errno();
            libc::close(fd);
            return Err((step, e));
        }
        Ok(fd)
    }
}
