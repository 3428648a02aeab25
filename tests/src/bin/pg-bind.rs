//! One bind(2), the way a hostile or careless process might try it, for the integration tests.
//! Prints `ok` or `errno N`. Runs in whatever cgroup (and network namespace) it was started in.
//!
//! Usage: pg-bind VARIANT PROTO ADDR PORT
//!   VARIANT: plain | reuseaddr | reuseport | freebind | thread | wait (reads a line from stdin
//!            first: started before the guard, binds after)
//!   PROTO:   tcp | udp | sctp
//!   ADDR:    an IPv4 or IPv6 address; `fe80::1%lo` style scope ids are accepted

use std::{ffi::CString, io::BufRead as _, net::IpAddr};

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
    let domain = if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let (ty, protocol) = match proto {
        "tcp" => (libc::SOCK_STREAM, 0),
        "udp" => (libc::SOCK_DGRAM, 0),
        "sctp" => (libc::SOCK_STREAM, libc::IPPROTO_SCTP),
        _ => panic!("proto tcp|udp|sctp"),
    };
    // SAFETY: plain socket calls on an fd closed at the end.
    unsafe {
        let fd = libc::socket(domain, ty, protocol);
        if fd < 0 {
            return Err(*libc::__errno_location());
        }
        let one: libc::c_int = 1;
        let set = |level, name| libc::setsockopt(fd, level, name, (&one as *const i32).cast(), 4);
        match variant {
            "reuseaddr" => {
                set(libc::SOL_SOCKET, libc::SO_REUSEADDR);
            }
            "reuseport" => {
                set(libc::SOL_SOCKET, libc::SO_REUSEPORT);
            }
            "freebind" => {
                if ip.is_ipv4() {
                    set(libc::IPPROTO_IP, libc::IP_FREEBIND);
                } else {
                    set(libc::IPPROTO_IPV6, 78 /* IPV6_FREEBIND */);
                }
            }
            _ => {}
        }
        let r = match ip {
            IpAddr::V4(a) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: port.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(a).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            }
            IpAddr::V6(a) => {
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: port.to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    sin6_scope_id: scope,
                };
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    size_of::<libc::sockaddr_in6>() as u32,
                )
            }
        };
        let e = *libc::__errno_location();
        libc::close(fd);
        if r == 0 {
            Ok(())
        } else {
            Err(e)
        }
    }
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
