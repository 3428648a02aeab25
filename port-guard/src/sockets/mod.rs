//! Who holds a port: every TCP and UDP socket of this network namespace with its local port,
//! state and owning process.
//!
//! Sockets come from netlink sock_diag (NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY), which on 6.8+
//! also lists TCP sockets that are bound but not listening (TCP_BOUND_INACTIVE; see
//! net/ipv4/inet_diag.c, inet_diag_dump_icsk). Without sock_diag (inet_diag not loaded) the
//! /proc/net tables are read instead, which list listening, connected and UDP sockets but not
//! bound-only TCP ones; [`Scan::bound_inactive_visible`] says which case applies. Processes are
//! found by matching socket inodes in /proc/PID/fd.

mod diag;

use std::{collections::HashMap, fs, io};

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

/// A socket as a table lists it: (local port, state, inode, cookie).
type Row = (u16, u8, u64, u64);

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
    let Listed {
        mut sockets,
        source,
        bound_inactive_visible,
    } = list(wanted);
    let complete = name_owners(&mut sockets, deadline);
    sockets.sort_by_key(|s| (s.port, s.protocol, s.family, s.inode));
    sockets.dedup_by_key(|s| (s.port, s.protocol, s.family, s.inode));
    Scan {
        sockets,
        bound_inactive_visible,
        source,
        partial: !complete,
    }
}

/// One table of sockets: what sock_diag is asked for, and the /proc/net file that lists the
/// same sockets where it cannot be asked.
struct Table {
    family: u8,
    protocol: u8,
    /// "tcp" or "udp".
    protocol_name: &'static str,
    /// "ipv4" or "ipv6".
    family_name: &'static str,
    proc_file: &'static str,
}

const TABLES: [Table; 4] = [
    Table {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_TCP as u8,
        protocol_name: "tcp",
        family_name: "ipv4",
        proc_file: "/proc/net/tcp",
    },
    Table {
        family: libc::AF_INET6 as u8,
        protocol: libc::IPPROTO_TCP as u8,
        protocol_name: "tcp",
        family_name: "ipv6",
        proc_file: "/proc/net/tcp6",
    },
    Table {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_UDP as u8,
        protocol_name: "udp",
        family_name: "ipv4",
        proc_file: "/proc/net/udp",
    },
    Table {
        family: libc::AF_INET6 as u8,
        protocol: libc::IPPROTO_UDP as u8,
        protocol_name: "udp",
        family_name: "ipv6",
        proc_file: "/proc/net/udp6",
    },
];

/// The sockets of a scan before their owners are named.
struct Listed {
    /// Every socket with a wanted local port, no owners yet.
    sockets: Vec<Socket>,
    source: &'static str,
    bound_inactive_visible: bool,
}

/// Lists every TCP and UDP socket with a local port in `wanted`, from sock_diag, or from
/// /proc/net for a table that sock_diag cannot dump.
fn list(wanted: impl Fn(u16, &'static str) -> bool) -> Listed {
    let all_states = !0u32;
    let mut sockets = Vec::new();
    let mut source = "sock_diag";
    let mut bound_inactive_visible = true;
    for t in TABLES {
        let rows = match diag::dump(t.family, t.protocol, all_states) {
            Ok(rows) => rows,
            Err(_) => {
                source = "/proc/net";
                if t.protocol_name == "tcp" {
                    bound_inactive_visible = false;
                }
                proc_net(t.proc_file).unwrap_or_default()
            }
        };
        for (port, state, inode, cookie) in rows {
            if port != 0 && wanted(port, t.protocol_name) {
                sockets.push(Socket {
                    port,
                    protocol: t.protocol_name,
                    family: t.family_name,
                    state: tcp_state(state),
                    inode,
                    cookie,
                    owners: Vec::new(),
                });
            }
        }
    }
    // TCP_BOUND_INACTIVE dumps arrived in 6.8 (inet_diag_dump_icsk); older kernels ignore the
    // state bit.
    bound_inactive_visible =
        bound_inactive_visible && source == "sock_diag" && kernel_at_least(6, 8);
    Listed {
        sockets,
        source,
        bound_inactive_visible,
    }
}

/// Names the processes that hold each socket, until `deadline` at most; false when it passed
/// before every process was looked at.
fn name_owners(sockets: &mut [Socket], deadline: Option<std::time::Instant>) -> bool {
    if sockets.is_empty() {
        return true;
    }
    let inodes: std::collections::HashSet<u64> = sockets.iter().map(|s| s.inode).collect();
    let (owners, complete) = owners_by_inode(&inodes, deadline);
    for s in sockets {
        s.owners = owners.get(&s.inode).cloned().unwrap_or_default();
    }
    complete
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
