//! Who holds a port: every TCP and UDP socket of this network namespace with its local port,
//! state and owning process.
//!
//! Sockets come from netlink sock_diag (NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY), which on 6.8+
//! also lists TCP sockets that are bound but not listening (TCP_BOUND_INACTIVE; see
//! net/ipv4/inet_diag.c, inet_diag_dump_icsk). Without sock_diag (inet_diag not loaded) the
//! /proc/net tables are read instead, which list listening, connected and UDP sockets but not
//! bound-only TCP ones; [`Scan::bound_inactive_visible`] says which case applies. Processes are
//! found by matching socket inodes in /proc/PID/fd.

use std::{
    collections::HashMap,
    fs, io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use crate::cgroup::{self, CgroupPath};

/// One socket with a local port.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Socket {
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: &'static str,
    /// "ipv4" or "ipv6".
    pub family: &'static str,
    /// listening, established, bound, ... (TCP states; "bound" for UDP without a peer).
    pub state: &'static str,
    pub inode: u64,
    /// The socket's cookie (sock_diag only; 0 from /proc/net): what `PG_SENTINELS` holds.
    pub cookie: u64,
    /// Owning processes (a socket can be shared across fork).
    pub owners: Vec<Owner>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Owner {
    pub pid: u32,
    pub command: String,
    pub cgroup: Option<CgroupPath>,
}

/// The result of a scan.
pub struct Scan {
    pub sockets: Vec<Socket>,
    /// Whether TCP sockets that are bound but not listening are included.
    pub bound_inactive_visible: bool,
    /// "sock_diag" or "/proc/net".
    pub source: &'static str,
    /// The owners were not all named before the deadline.
    pub partial: bool,
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u8 = 10;
const TCP_CLOSE: u8 = 7;
const TCP_BOUND_INACTIVE: u8 = 13;

fn tcp_state(s: u8) -> &'static str {
    match s {
        1 => "established",
        2 => "syn-sent",
        3 => "syn-recv",
        4 => "fin-wait-1",
        5 => "fin-wait-2",
        6 => "time-wait",
        // A TCP socket in CLOSE that has a port is bound, not listening (sock_diag reports
        // bound-only sockets with their sk_state, TCP_CLOSE).
        TCP_CLOSE => "bound",
        8 => "close-wait",
        9 => "last-ack",
        TCP_LISTEN => "listening",
        11 => "closing",
        TCP_BOUND_INACTIVE => "bound",
        _ => "unknown",
    }
}

#[repr(C)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: [u8; 48],
}

/// A socket as a table lists it: (local port, state, inode, cookie).
type Row = (u16, u8, u64, u64);

/// Dumps one family/protocol through sock_diag.
fn diag_dump(family: u8, protocol: u8, states: u32) -> io::Result<Vec<Row>> {
    // SAFETY: plain socket calls on an fd owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct Req {
        hdr: NlMsgHdr,
        body: InetDiagReqV2,
    }
    let req = Req {
        hdr: NlMsgHdr {
            len: size_of::<Req>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: NLM_F_REQUEST | NLM_F_DUMP,
            seq: 1,
            pid: 0,
        },
        body: InetDiagReqV2 {
            family,
            protocol,
            ext: 0,
            pad: 0,
            states,
            id: [0; 48],
        },
    };
    // SAFETY: sending a fully initialised request.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&req as *const Req).cast(),
            size_of::<Req>(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into our buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let mut off = 0;
        while off + size_of::<NlMsgHdr>() <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            if len < size_of::<NlMsgHdr>() || off + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated sock_diag message",
                ));
            }
            let body = &buf[off + size_of::<NlMsgHdr>()..off + len];
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(body[..4].try_into().unwrap());
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY if body.len() >= 4 + 48 + 20 => {
                    // inet_diag_msg: family, state, timer, retrans, id { sport be16, ... },
                    // expires, rqueue, wqueue, uid, inode.
                    let state = body[1];
                    let sport = u16::from_be_bytes([body[4], body[5]]);
                    let inode =
                        u32::from_ne_bytes(body[4 + 48 + 16..4 + 48 + 20].try_into().unwrap());
                    // id: sport, dport, src[16], dst[16], if, cookie[2] (u32 each, native).
                    let lo = u32::from_ne_bytes(body[4 + 40..4 + 44].try_into().unwrap());
                    let hi = u32::from_ne_bytes(body[4 + 44..4 + 48].try_into().unwrap());
                    let cookie = u64::from(lo) | (u64::from(hi) << 32);
                    out.push((sport, state, u64::from(inode), cookie));
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// Reads a /proc/net table (no cookies there).
fn proc_net(file: &str) -> io::Result<Vec<Row>> {
    // The calling thread's netns (it may have entered another than the process's).
    let text = fs::read_to_string(file.replacen("/proc/net/", "/proc/thread-self/net/", 1))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(c.get(1)?.rsplit(':').next()?, 16).ok()?;
            let state = u8::from_str_radix(c.get(3)?, 16).ok()?;
            let inode = c.get(9)?.parse().ok()?;
            Some((port, state, inode, 0))
        })
        .collect())
}

/// Socket inode → processes holding it, for the inodes in `wanted`; false when `deadline`
/// passed before every process was looked at.
fn owners_by_inode(
    wanted: &std::collections::HashSet<u64>,
    deadline: Option<std::time::Instant>,
) -> (HashMap<u64, Vec<Owner>>, bool) {
    let mut map: HashMap<u64, Vec<Owner>> = HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return (map, true);
    };
    for p in procs.flatten() {
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return (map, false);
        }
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut mine = Vec::new();
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|i| wanted.contains(i))
            {
                mine.push(inode);
            }
        }
        if mine.is_empty() {
            continue;
        }
        let command = fs::read_to_string(p.path().join("comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let cg = cgroup::of_pid(pid);
        for inode in mine {
            let owners = map.entry(inode).or_default();
            if !owners.iter().any(|o| o.pid == pid) {
                owners.push(Owner {
                    pid,
                    command: command.clone(),
                    cgroup: cg.clone(),
                });
            }
        }
    }
    (map, true)
}

/// Every TCP and UDP socket with a local port in `wanted` (host order ports).
pub fn scan(wanted: impl Fn(u16, &'static str) -> bool) -> Scan {
    scan_until(wanted, None)
}

/// [`scan`], naming the owners until `deadline` at most ([`Scan::partial`] when it passed).
pub fn scan_until(
    wanted: impl Fn(u16, &'static str) -> bool,
    deadline: Option<std::time::Instant>,
) -> Scan {
    let all_states = !0u32;
    let mut raw: Vec<(u16, &'static str, &'static str, u8, u64, u64)> = Vec::new();
    let mut source = "sock_diag";
    let mut bound_inactive_visible = true;
    let tables = [
        (
            libc::AF_INET as u8,
            libc::IPPROTO_TCP as u8,
            "tcp",
            "ipv4",
            "/proc/net/tcp",
        ),
        (
            libc::AF_INET6 as u8,
            libc::IPPROTO_TCP as u8,
            "tcp",
            "ipv6",
            "/proc/net/tcp6",
        ),
        (
            libc::AF_INET as u8,
            libc::IPPROTO_UDP as u8,
            "udp",
            "ipv4",
            "/proc/net/udp",
        ),
        (
            libc::AF_INET6 as u8,
            libc::IPPROTO_UDP as u8,
            "udp",
            "ipv6",
            "/proc/net/udp6",
        ),
    ];
    for (family, proto, pname, fname, proc_file) in tables {
        let rows = match diag_dump(family, proto, all_states) {
            Ok(rows) => rows,
            Err(_) => {
                source = "/proc/net";
                if pname == "tcp" {
                    bound_inactive_visible = false;
                }
                proc_net(proc_file).unwrap_or_default()
            }
        };
        for (port, state, inode, cookie) in rows {
            if port != 0 && wanted(port, pname) {
                raw.push((port, pname, fname, state, inode, cookie));
            }
        }
    }
    // TCP_BOUND_INACTIVE dumps arrived in 6.8 (inet_diag_dump_icsk); older kernels ignore the
    // state bit.
    bound_inactive_visible =
        bound_inactive_visible && source == "sock_diag" && kernel_at_least(6, 8);
    let inodes: std::collections::HashSet<u64> = raw.iter().map(|r| r.4).collect();
    let (owners, complete) = if raw.is_empty() {
        (HashMap::new(), true)
    } else {
        owners_by_inode(&inodes, deadline)
    };
    let mut sockets: Vec<Socket> = raw
        .into_iter()
        .map(|(port, protocol, family, state, inode, cookie)| Socket {
            port,
            protocol,
            family,
            state: tcp_state(state),
            inode,
            cookie,
            owners: owners.get(&inode).cloned().unwrap_or_default(),
        })
        .collect();
    sockets.sort_by_key(|s| (s.port, s.protocol, s.family, s.inode));
    sockets.dedup_by_key(|s| (s.port, s.protocol, s.family, s.inode));
    Scan {
        sockets,
        bound_inactive_visible,
        source,
        partial: !complete,
    }
}

/// Whether the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse::<u32>().ok());
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= (major, minor)
}
