//! One bind(2), the way a hostile or careless process might try it, for the integration tests.
//! Prints `ok` or `errno N`. Runs in whatever cgroup (and network namespace) it was started in.
//!
//! Usage: pg-bind VARIANT PROTO ADDR PORT
//!   VARIANT: plain | reuseaddr | reuseport | freebind | thread | wait (reads a line from stdin
//!            first: started before the guard, binds after)
//!   PROTO:   tcp | udp | sctp
//!   ADDR:    an IPv4 or IPv6 address; `fe80::1%lo` style scope ids are accepted

use std::{
    ffi::CString,
    io::BufRead as _,
    net::{IpAddr, SocketAddr, SocketAddrV6},
};

use socket2::{Domain, Protocol, Socket, Type};

fn bind_once(variant: &str, proto: &str, addr: &str, port: u16) -> Result<(), i32> {
    let (ip, scope) = match addr.split_once('%') {
        Some((a, ifname)) => {
            let c = CString::new(ifname).unwrap();
            // SAFETY: valid C string.
            (a, unsafe { libc::if_nametoindex(c.as_ptr()) })
        }
        None => (addr, 0),
    };
    let ip: IpAddr = ip.parse().expect("address");
    let sa = match ip {
        IpAddr::V4(a) => SocketAddr::new(a.into(), port),
        IpAddr::V6(a) => SocketAddrV6::new(a, port, 0, scope).into(),
    };
    let (ty, protocol) = match proto {
        "tcp" => (Type::STREAM, None),
        "udp" => (Type::DGRAM, None),
        "sctp" => (Type::STREAM, Some(Protocol::SCTP)),
        _ => panic!("proto tcp|udp|sctp"),
    };
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or_default();
    // new_raw: socket(2) with exactly these flags (no SOCK_CLOEXEC), as a careless caller would.
    let s = Socket::new_raw(Domain::for_address(sa), ty, protocol).map_err(errno)?;
    // Option failures are ignored: the bind is what is being tested.
    let _ = match variant {
        "reuseaddr" => s.set_reuse_address(true),
        "reuseport" => s.set_reuse_port(true),
        "freebind" if ip.is_ipv4() => s.set_freebind_v4(true),
        "freebind" => s.set_freebind_v6(true),
        _ => Ok(()),
    };
    s.bind(&sa.into()).map_err(errno)
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [variant, proto, addr, port] = &a[..] else {
        panic!("usage: pg-bind VARIANT PROTO ADDR PORT");
    };
    let port: u16 = port.parse().expect("port");
    if variant == "wait" {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).unwrap();
    }
    let result = if variant == "thread" {
        let (v, p, ad) = (variant.clone(), proto.clone(), addr.clone());
        std::thread::spawn(move || bind_once(&v, &p, &ad, port))
            .join()
            .unwrap()
    } else {
        bind_once(variant, proto, addr, port)
    };
    match result {
        Ok(()) => println!("ok"),
        Err(e) => println!("errno {e}"),
    }
}
