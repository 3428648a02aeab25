//! What an unprivileged local user can throw at the guard, for the hardening tests. Every
//! command prints one JSON line.
//!
//! Usage: pg-attack [--cgroup DIR] [--uid UID] [--comm NAME] COMMAND ARGS
//!   --cgroup DIR  move into this cgroup (an absolute dir on the cgroup2 mount) first, as root
//!   --uid UID     then drop to UID (and the same gid, no supplementary groups)
//!   --comm NAME   then set the process name
//!
//!   hold-connections ADDR N SECONDS
//!       keeps N TCP connections to ADDR open, opening a new one whenever one closes, for
//!       SECONDS: {"connects", "max_open", "errors"}
//!   bind-flood ADDR PORT SECONDS
//!       bind(2)s one TCP socket to ADDR:PORT over and over for SECONDS:
//!       {"binds", "ok", "errnos": {errno: count}}
//!   hop-flood DIR N ADDR PORT
//!       moves itself into DIR/0 .. DIR/N-1 in turn (cgroups the caller made) and binds
//!       ADDR:PORT once from each: N offenders, one refused bind each: {"binds", "ok", "errnos"}
//!   autopick TRICK LISTEN_PORT
//!       lets the kernel choose a local port, one way: `port-range` (IP_LOCAL_PORT_RANGE narrowed
//!       to LISTEN_PORT, then listen() unbound), `bind-no-port` (IP_BIND_ADDRESS_NO_PORT, bind to
//!       port 0, connect), `connect`, `fastopen` (sendto with MSG_FASTOPEN), `sendto` (UDP),
//!       `bind0`. For the connecting tricks a listener is opened on 127.0.0.1:LISTEN_PORT first.
//!       {"trick", "port"} with the port the kernel chose, or {"trick", "errno"}

use std::{
    collections::BTreeMap,
    ffi::CString,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use socket2::{Domain, SockAddr, Socket, Type};

const IP_BIND_ADDRESS_NO_PORT: i32 = 24;
const IP_LOCAL_PORT_RANGE: i32 = 51;
const MSG_FASTOPEN: i32 = 0x2000_0000;

fn fail(what: &str) -> ! {
    eprintln!("pg-attack: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(2)
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn drop_to(uid: u32) {
    // SAFETY: plain syscalls; the order (groups, gid, uid) is the one that works.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            fail("setgroups");
        }
        if libc::setgid(uid) != 0 {
            fail("setgid");
        }
        if libc::setuid(uid) != 0 {
            fail("setuid");
        }
    }
}

fn hold_connections(addr: SocketAddr, n: usize, secs: u64) -> String {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut open: Vec<Socket> = Vec::new();
    let (mut connects, mut errors, mut max_open) = (0u64, 0u64, 0usize);
    while Instant::now() < end {
        // Drop what the server closed (a read of 0 bytes or an error).
        open.retain(|s| {
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            match s.peek(&mut buf) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            }
        });
        while open.len() < n {
            let s =
                Socket::new(Domain::IPV4, Type::STREAM, None).unwrap_or_else(|_| fail("socket"));
            match s.connect_timeout(&addr.into(), Duration::from_millis(200)) {
                Ok(()) => {
                    connects += 1;
                    s.set_nonblocking(true)
                        .unwrap_or_else(|_| fail("nonblocking"));
                    open.push(s);
                }
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
        }
        max_open = max_open.max(open.len());
        std::thread::sleep(Duration::from_millis(50));
    }
    format!(r#"{{"connects":{connects},"max_open":{max_open},"errors":{errors}}}"#)
}

fn bind_flood(addr: SocketAddr, secs: f64) -> String {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .unwrap_or_else(|_| fail("socket"));
    let sa = SockAddr::from(addr);
    let (mut binds, mut ok) = (0u64, 0u64);
    let mut errnos: BTreeMap<i32, u64> = BTreeMap::new();
    while Instant::now() < end {
        for _ in 0..1000 {
            binds += 1;
            match s.bind(&sa) {
                Ok(()) => {
                    ok += 1;
                    break;
                }
                Err(e) => *errnos.entry(errno_of(&e)).or_default() += 1,
            }
        }
        if ok > 0 {
            break;
        }
    }
    tally(binds, ok, &errnos)
}

/// Like [`bind_flood`], with a fresh socket for every bind: what a bind leaves behind on a socket
/// (bound after all, despite an error) cannot hide later results.
fn bind_flood_fresh(addr: SocketAddr, secs: f64) -> String {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let sa = SockAddr::from(addr);
    let (mut binds, mut ok) = (0u64, 0u64);
    let mut errnos: BTreeMap<i32, u64> = BTreeMap::new();
    while Instant::now() < end {
        for _ in 0..100 {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)
                .unwrap_or_else(|_| fail("socket"));
            binds += 1;
            match s.bind(&sa) {
                Ok(()) => ok += 1,
                Err(e) => *errnos.entry(errno_of(&e)).or_default() += 1,
            }
        }
    }
    tally(binds, ok, &errnos)
}

fn hop_flood(dir: &str, n: usize, addr: SocketAddr) -> String {
    let sa = SockAddr::from(addr);
    let (mut binds, mut ok) = (0u64, 0u64);
    let mut errnos: BTreeMap<i32, u64> = BTreeMap::new();
    for i in 0..n {
        std::fs::write(format!("{dir}/{i}/cgroup.procs"), "0")
            .unwrap_or_else(|_| fail("entering a cgroup"));
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)
            .unwrap_or_else(|_| fail("socket"));
        binds += 1;
        match s.bind(&sa) {
            Ok(()) => ok += 1,
            Err(e) => *errnos.entry(errno_of(&e)).or_default() += 1,
        }
    }
    tally(binds, ok, &errnos)
}

/// `{"binds", "ok", "errnos": {errno: count}}`.
/// Tries to pass for the daemon's sentinel: SO_MARK `mark` on a TCP socket, then bind it to
/// `addr`. `{"mark":0|errno,"bind":0|errno}`.
fn mark_bind(addr: SocketAddr, mark: u32) -> String {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .unwrap_or_else(|_| fail("socket"));
    let marked = s.set_mark(mark).map_or_else(|e| errno_of(&e), |()| 0);
    let bound = s
        .bind(&SockAddr::from(addr))
        .map_or_else(|e| errno_of(&e), |()| 0);
    format!(r#"{{"mark":{marked},"bind":{bound}}}"#)
}

fn tally(binds: u64, ok: u64, errnos: &BTreeMap<i32, u64>) -> String {
    let errnos: Vec<String> = errnos
        .iter()
        .map(|(e, n)| format!(r#""{e}":{n}"#))
        .collect();
    format!(
        r#"{{"binds":{binds},"ok":{ok},"errnos":{{{}}}}}"#,
        errnos.join(",")
    )
}

fn local_port(s: &Socket) -> u16 {
    s.local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or(0, |a| a.port())
}

fn setopt(s: &Socket, level: i32, name: i32, value: u32) -> std::io::Result<()> {
    // SAFETY: a u32 option value of its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const u32).cast(),
            size_of::<u32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn autopick(trick: &str, listen_port: u16) -> String {
    let lo = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, listen_port));
    // A listener to connect to, on a port of the caller's choosing (not reserved).
    let _listener = match trick {
        "bind-no-port" | "connect" | "fastopen" => {
            Some(TcpListener::bind(lo).unwrap_or_else(|_| fail("listen for the connecting tricks")))
        }
        _ => None,
    };
    let result = (|| -> std::io::Result<u16> {
        match trick {
            "port-range" => {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                setopt(
                    &s,
                    libc::IPPROTO_IP,
                    IP_LOCAL_PORT_RANGE,
                    u32::from(listen_port) | (u32::from(listen_port) << 16),
                )?;
                s.listen(1)?;
                Ok(local_port(&s))
            }
            "bind-no-port" => {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                setopt(&s, libc::IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)?;
                s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
                s.connect(&lo.into())?;
                Ok(local_port(&s))
            }
            "connect" => {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                s.connect(&lo.into())?;
                Ok(local_port(&s))
            }
            "fastopen" => {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                s.send_to_with_flags(b"x", &lo.into(), MSG_FASTOPEN)?;
                Ok(local_port(&s))
            }
            "sendto" => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
                s.send_to(b"x", &lo.into())?;
                Ok(local_port(&s))
            }
            "bind0" => {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
                Ok(local_port(&s))
            }
            other => panic!("unknown trick {other}"),
        }
    })();
    match result {
        Ok(port) => format!(r#"{{"trick":"{trick}","port":{port}}}"#),
        Err(e) => format!(r#"{{"trick":"{trick}","errno":{}}}"#, errno_of(&e)),
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take = |flag: &str| -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        let v = args.get(i + 1).cloned();
        args.drain(i..=(i + 1).min(args.len() - 1));
        v
    };
    let cgroup = take("--cgroup");
    let uid = take("--uid");
    let comm = take("--comm");
    if let Some(dir) = cgroup {
        std::fs::write(format!("{dir}/cgroup.procs"), "0")
            .unwrap_or_else(|_| fail("entering the cgroup"));
    }
    if let Some(uid) = uid {
        drop_to(uid.parse().expect("uid"));
    }
    if let Some(comm) = comm {
        let c = CString::new(comm).expect("comm");
        // SAFETY: a valid C string.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) };
    }
    let line = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["hold-connections", addr, n, secs] => hold_connections(
            addr.parse().expect("ADDR"),
            n.parse().expect("N"),
            secs.parse().expect("SECONDS"),
        ),
        ["bind-flood", addr, port, secs] => bind_flood(
            SocketAddr::new(addr.parse().expect("ADDR"), port.parse().expect("PORT")),
            secs.parse().expect("SECONDS"),
        ),
        ["bind-flood-fresh", addr, port, secs] => bind_flood_fresh(
            SocketAddr::new(addr.parse().expect("ADDR"), port.parse().expect("PORT")),
            secs.parse().expect("SECONDS"),
        ),
        ["mark-bind", addr, port, mark] => mark_bind(
            SocketAddr::new(addr.parse().expect("ADDR"), port.parse().expect("PORT")),
            mark.parse().expect("MARK"),
        ),
        ["hop-flood", dir, n, addr, port] => hop_flood(
            dir,
            n.parse().expect("N"),
            SocketAddr::new(addr.parse().expect("ADDR"), port.parse().expect("PORT")),
        ),
        ["autopick", trick, port] => autopick(trick, port.parse().expect("LISTEN_PORT")),
        _ => {
            eprintln!("usage: pg-attack [--cgroup DIR] [--uid UID] [--comm NAME] hold-connections ADDR N SECONDS | bind-flood ADDR PORT SECONDS | bind-flood-fresh ADDR PORT SECONDS | mark-bind ADDR PORT MARK | hop-flood DIR N ADDR PORT | autopick TRICK LISTEN_PORT");
            std::process::exit(2)
        }
    };
    println!("{line}");
}
