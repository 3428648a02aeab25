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
//!   grab ADDR tcp|udp FIRST LAST THREADS plain|reuseaddr|reuseport
//!       binds every port FIRST..=LAST (a fresh socket each, with the option), spread over
//!       THREADS threads that start at one instant, and holds what it got (TCP: listening):
//!       {"ok": [ports], "errnos": {errno: count}}. Then reads stdin: `close P` closes the socket
//!       on P and answers {"closed": P}; `grab P` binds P again and answers {"port": P, "errno": 0|E};
//!       end of input exits.
//!   chain DIR LEVELS NAMELEN [PORT]
//!       makes a chain of LEVELS nested cgroups with names of NAMELEN bytes below DIR (relative
//!       to directory fds: the whole path may be longer than PATH_MAX), then, with PORT, moves
//!       into the deepest and binds 0.0.0.0:PORT once: {"levels", "bytes", "bind": 0|errno}
//!   unchain DIR LEVELS NAMELEN
//!       removes such a chain, deepest first: {"removed"}
//!   many-flood DIR N ADDR PORT SECONDS
//!       moves into DIR/0 .. DIR/N-1 round and round (cgroups the caller made) and binds
//!       ADDR:PORT once from each, for SECONDS: {"binds", "ok", "errnos"}
//!   thread-netns-bind ADDR PORT
//!       a thread enters a network namespace of its own (unshare, as root) and binds ADDR:PORT
//!       there: {"bind": 0|errno}
//!   hold-port ADDR PORT SECONDS
//!       holds a TCP listener and a UDP socket on ADDR:PORT, prints {"ready": true}, sleeps
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
    // At least one round, however late the process got the CPU: a flood of no bind would
    // pass for refused.
    loop {
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
        if ok > 0 || Instant::now() >= end {
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

/// Opens `name` below the directory `dir` (a cgroup), never by a whole path.
fn open_below(dir: &std::os::fd::OwnedFd, name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    let c = CString::new(name).expect("name");
    // SAFETY: a valid dir fd and C string.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        fail("openat");
    }
    // SAFETY: a fresh fd nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

fn open_dir(path: &str) -> std::os::fd::OwnedFd {
    std::fs::File::open(path)
        .unwrap_or_else(|_| fail(path))
        .into()
}

fn chain(dir: &str, levels: usize, namelen: usize, port: Option<u16>) -> String {
    let name = "c".repeat(namelen);
    let c = CString::new(name.as_str()).expect("name");
    let mut fd = open_dir(dir);
    for _ in 0..levels {
        // SAFETY: a valid dir fd and C string.
        if unsafe { libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), 0o755) } != 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
        {
            fail("mkdirat");
        }
        fd = open_below(&fd, &name);
    }
    let bytes = dir.len() + levels * (namelen + 1);
    let bind = match port {
        None => -1,
        Some(p) => {
            let procs = CString::new("cgroup.procs").unwrap();
            // SAFETY: valid dir fd and C string.
            let f = unsafe { libc::openat(fd.as_raw_fd(), procs.as_ptr(), libc::O_WRONLY) };
            if f < 0 || unsafe { libc::write(f, b"0".as_ptr().cast(), 1) } != 1 {
                fail("entering the deepest cgroup");
            }
            // SAFETY: a valid fd.
            unsafe { libc::close(f) };
            let s =
                Socket::new(Domain::IPV4, Type::STREAM, None).unwrap_or_else(|_| fail("socket"));
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, p)).into())
                .map_or_else(|e| errno_of(&e), |()| 0)
        }
    };
    format!(r#"{{"levels":{levels},"bytes":{bytes},"bind":{bind}}}"#)
}

fn unchain(dir: &str, levels: usize, namelen: usize) -> String {
    let name = "c".repeat(namelen);
    let c = CString::new(name.as_str()).expect("name");
    let mut fds = vec![open_dir(dir)];
    for _ in 0..levels {
        let Some(last) = fds.last() else { break };
        let c2 = CString::new(name.as_str()).unwrap();
        // SAFETY: a valid dir fd and C string.
        let fd = unsafe {
            libc::openat(
                last.as_raw_fd(),
                c2.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            break;
        }
        // SAFETY: a fresh fd.
        fds.push(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    let mut removed = 0;
    // Deepest first: each level is removed from its parent's fd.
    while fds.len() > 1 {
        fds.pop();
        let parent = fds.last().expect("the top stays");
        // SAFETY: a valid dir fd and C string.
        if unsafe { libc::unlinkat(parent.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) } == 0 {
            removed += 1;
        }
    }
    format!(r#"{{"removed":{removed}}}"#)
}

fn many_flood(dir: &str, n: usize, addr: SocketAddr, secs: f64) -> String {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let sa = SockAddr::from(addr);
    let (mut binds, mut ok) = (0u64, 0u64);
    let mut errnos: BTreeMap<i32, u64> = BTreeMap::new();
    let procs: Vec<std::fs::File> = (0..n)
        .map(|i| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(format!("{dir}/{i}/cgroup.procs"))
                .unwrap_or_else(|_| fail("opening a cgroup.procs"))
        })
        .collect();
    while Instant::now() < end {
        for mut p in &procs {
            use std::io::Write as _;
            p.write_all(b"0")
                .unwrap_or_else(|_| fail("entering a cgroup"));
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

fn thread_netns_bind(addr: SocketAddr) -> String {
    let r = std::thread::spawn(move || {
        // SAFETY: unshare moves this thread alone into a new netns.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            fail("unshare(CLONE_NEWNET)");
        }
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)
            .unwrap_or_else(|_| fail("socket"));
        s.bind(&addr.into()).map_or_else(|e| errno_of(&e), |()| 0)
    })
    .join()
    .unwrap_or_else(|_| fail("the thread panicked"));
    format!(r#"{{"bind":{r}}}"#)
}

fn hold_port(addr: SocketAddr, secs: u64) {
    let t = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .unwrap_or_else(|_| fail("socket"));
    t.bind(&addr.into()).unwrap_or_else(|_| fail("bind tcp"));
    t.listen(8).unwrap_or_else(|_| fail("listen"));
    let u = Socket::new(Domain::for_address(addr), Type::DGRAM, None)
        .unwrap_or_else(|_| fail("socket"));
    u.bind(&addr.into()).unwrap_or_else(|_| fail("bind udp"));
    println!(r#"{{"ready":true}}"#);
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(secs));
    drop((t, u));
}

/// One socket bound to `addr` with `opt`, listening when TCP.
fn bind_one(addr: SocketAddr, udp: bool, opt: &str) -> std::io::Result<Socket> {
    let ty = if udp { Type::DGRAM } else { Type::STREAM };
    let s = Socket::new(Domain::for_address(addr), ty, None)?;
    match opt {
        "reuseaddr" => s.set_reuse_address(true)?,
        "reuseport" => s.set_reuse_port(true)?,
        _ => {}
    }
    if addr.is_ipv6() {
        s.set_only_v6(false)?;
    }
    s.bind(&addr.into())?;
    if !udp {
        s.listen(8)?;
    }
    Ok(s)
}

fn grab(ip: std::net::IpAddr, udp: bool, first: u16, last: u16, threads: usize, opt: &str) {
    use std::io::BufRead as _;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads));
    let opt = opt.to_owned();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = std::sync::Arc::clone(&barrier);
            let opt = opt.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut got = Vec::new();
                let mut errs = Vec::new();
                let mut port = u32::from(first) + t as u32;
                while port <= u32::from(last) {
                    match bind_one(SocketAddr::new(ip, port as u16), udp, &opt) {
                        Ok(s) => got.push((port as u16, s)),
                        Err(e) => errs.push(errno_of(&e)),
                    }
                    port += threads as u32;
                }
                (got, errs)
            })
        })
        .collect();
    let mut held: BTreeMap<u16, Socket> = BTreeMap::new();
    let mut errnos: BTreeMap<i32, u64> = BTreeMap::new();
    for h in handles {
        let (got, errs) = h
            .join()
            .unwrap_or_else(|_| fail("a grabbing thread panicked"));
        held.extend(got);
        for e in errs {
            *errnos.entry(e).or_default() += 1;
        }
    }
    let ok: Vec<String> = held.keys().map(u16::to_string).collect();
    let errnos: Vec<String> = errnos
        .iter()
        .map(|(e, n)| format!(r#""{e}":{n}"#))
        .collect();
    println!(
        r#"{{"ok":[{}],"errnos":{{{}}}}}"#,
        ok.join(","),
        errnos.join(",")
    );
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["close", p] => {
                let p: u16 = p.parse().expect("PORT");
                held.remove(&p);
                println!(r#"{{"closed":{p}}}"#);
            }
            ["grab", p] => {
                let p: u16 = p.parse().expect("PORT");
                match bind_one(SocketAddr::new(ip, p), udp, &opt) {
                    Ok(s) => {
                        held.insert(p, s);
                        println!(r#"{{"port":{p},"errno":0}}"#);
                    }
                    Err(e) => println!(r#"{{"port":{p},"errno":{}}}"#, errno_of(&e)),
                }
            }
            _ => println!(r#"{{"error":"unknown command"}}"#),
        }
    }
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
        ["chain", dir, levels, namelen] => chain(
            dir,
            levels.parse().expect("LEVELS"),
            namelen.parse().expect("NAMELEN"),
            None,
        ),
        ["chain", dir, levels, namelen, port] => chain(
            dir,
            levels.parse().expect("LEVELS"),
            namelen.parse().expect("NAMELEN"),
            Some(port.parse().expect("PORT")),
        ),
        ["unchain", dir, levels, namelen] => unchain(
            dir,
            levels.parse().expect("LEVELS"),
            namelen.parse().expect("NAMELEN"),
        ),
        ["many-flood", dir, n, addr, port, secs] => many_flood(
            dir,
            n.parse().expect("N"),
            SocketAddr::new(addr.parse().expect("ADDR"), port.parse().expect("PORT")),
            secs.parse().expect("SECONDS"),
        ),
        ["thread-netns-bind", addr, port] => thread_netns_bind(SocketAddr::new(
            addr.parse().expect("ADDR"),
            port.parse().expect("PORT"),
        )),
        ["hold-port", addr, port, secs] => {
            hold_port(
                SocketAddr::new(addr.parse().expect("ADDR"), port.parse().expect("PORT")),
                secs.parse().expect("SECONDS"),
            );
            return;
        }
        ["grab", addr, proto, first, last, threads, opt] => {
            grab(
                addr.parse().expect("ADDR"),
                proto == "udp",
                first.parse().expect("FIRST"),
                last.parse().expect("LAST"),
                threads.parse().expect("THREADS"),
                opt,
            );
            return;
        }
        _ => {
            eprintln!("usage: pg-attack [--cgroup DIR] [--uid UID] [--comm NAME] hold-connections ADDR N SECONDS | bind-flood ADDR PORT SECONDS | bind-flood-fresh ADDR PORT SECONDS | mark-bind ADDR PORT MARK | hop-flood DIR N ADDR PORT | autopick TRICK LISTEN_PORT | grab ADDR tcp|udp FIRST LAST THREADS plain|reuseaddr|reuseport | chain DIR LEVELS NAMELEN [PORT] | unchain DIR LEVELS NAMELEN | many-flood DIR N ADDR PORT SECONDS | thread-netns-bind ADDR PORT | hold-port ADDR PORT SECONDS");
            std::process::exit(2)
        }
    };
    println!("{line}");
}
