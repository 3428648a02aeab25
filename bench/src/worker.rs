//! `port-guard-bench worker`: the measuring process. The orchestrator starts one per scenario,
//! already moved into the scenario's cgroup, and sends it one JSON request per line on stdin; it
//! answers one JSON line on stdout. Timed loops run here and nowhere else, so nothing but the
//! syscalls under test sits between the two clock reads.

use std::{
    ffi::CString,
    io::{self, BufRead as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use port_guard::{leases, maps::Maps, pin::PinDir, policy::Protocols};
use serde_json::{json, Value};
use socket2::{Domain, SockAddr, Socket, Type};

#[derive(Default)]
struct State {
    /// A TCP socket bound once (to a kernel-chosen port): binding it again runs the hook and then
    /// fails with EINVAL in __inet_bind, so the loop measures the hook and the syscall only.
    prebound: Option<Socket>,
    maps: Option<(PathBuf, Maps)>,
}

pub fn run() -> Result<()> {
    let mut state = State::default();
    let mut out = io::stdout().lock();
    for line in io::stdin().lock().lines() {
        let line = line.context("reading a request")?;
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(req) => {
                handle(&mut state, &req).unwrap_or_else(|e| json!({ "error": format!("{e:#}") }))
            }
            Err(e) => json!({ "error": format!("bad request {line:?}: {e}") }),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

fn field(req: &Value, name: &str) -> Result<u64> {
    req[name]
        .as_u64()
        .with_context(|| format!("request has no number {name:?}"))
}

fn handle(state: &mut State, req: &Value) -> Result<Value> {
    match req["op"].as_str().unwrap_or_default() {
        "cgroup" => {
            let text = std::fs::read_to_string("/proc/self/cgroup")?;
            let path = text
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or_default();
            Ok(json!({ "cgroup": path }))
        }
        "hook" => {
            let port = field(req, "port")? as u16;
            let n = field(req, "n")?;
            if state.prebound.is_none() {
                let sock = tcp4_socket()?;
                sock.bind(&sockaddr4(0))
                    .context("binding the pre-bound socket")?;
                state.prebound = Some(sock);
            }
            let sock = state.prebound.as_ref().expect("just set");
            let sa = sockaddr4(port);
            timed_binds(n, || Ok(bind_errno(sock, &sa)))
        }
        "cycle" => {
            let port = field(req, "port")? as u16;
            let n = field(req, "n")?;
            let sa = sockaddr4(port);
            // socket() (SOCK_CLOEXEC), bind() and close(): one syscall each.
            timed_binds(n, || {
                let sock = tcp4_socket()?;
                let e = bind_errno(&sock, &sa);
                drop(sock);
                Ok(e)
            })
        }
        "alloc_lib" => {
            // The library path, as `spawn` runs it: this process is the lessee.
            let pin = PathBuf::from(req["pin"].as_str().context("no pin")?);
            let id = field(req, "cgroup_id")?;
            let level = field(req, "level")? as u32;
            let m = field(req, "m")?;
            let maps = open_maps(state, &pin)?;
            let mut ns = Vec::with_capacity(m as usize);
            let mut ports = Vec::with_capacity(m as usize);
            for _ in 0..m {
                let t = Instant::now();
                let port = maps.allocate(
                    port_guard::leases::Holder::until_empty(id, level),
                    None,
                    &port_guard::netns::ProbeIn::here(),
                )?;
                ns.push(t.elapsed().as_nanos() as u64);
                ports.push(port);
            }
            for p in &ports {
                maps.leases_mut().release(*p)?;
            }
            Ok(json!({ "ns": ns, "first_port": ports.first(), "last_port": ports.last() }))
        }
        "alloc_bare" => {
            // What libvirt's virPortAllocatorAcquire does: an in-process bitmap of the ports it
            // handed out, and a probe bind of each candidate (tcp on [::] and 0.0.0.0).
            let first = field(req, "first")? as u16;
            let last = field(req, "last")? as u16;
            let prefill = field(req, "prefill")?;
            let m = field(req, "m")?;
            let mut used = vec![false; usize::from(last - first) + 1];
            used[..prefill as usize].fill(true);
            let mut ns = Vec::with_capacity(m as usize);
            for _ in 0..m {
                let t = Instant::now();
                let mut got = None;
                for port in first..=last {
                    if used[usize::from(port - first)] {
                        continue;
                    }
                    if leases::probe_free(port, Protocols::TCP)? {
                        used[usize::from(port - first)] = true;
                        got = Some(port);
                        break;
                    }
                }
                ns.push(t.elapsed().as_nanos() as u64);
                if got.is_none() {
                    bail!("the bare allocator found no free port in {first}-{last}");
                }
            }
            Ok(json!({ "ns": ns }))
        }
        "deny" => {
            // Refused binds on fresh sockets, for the daemon's memory after denials.
            let port = field(req, "port")? as u16;
            let n = field(req, "n")?;
            let sa = sockaddr4(port);
            let mut refused = 0u64;
            for _ in 0..n {
                if bind_errno(&tcp4_socket()?, &sa) != 0 {
                    refused += 1;
                }
            }
            Ok(json!({ "refused": refused }))
        }
        "flood" => {
            // Refused binds as fast as one process can make them, for `ms` milliseconds: one
            // socket bound again and again (a bind the hook refuses leaves it unbound).
            let port = field(req, "port")? as u16;
            let ms = field(req, "ms")?;
            let sock = tcp4_socket()?;
            let sa = sockaddr4(port);
            let mut errnos = Errnos::default();
            let mut n = 0u64;
            let end = Duration::from_millis(ms);
            let t = Instant::now();
            while t.elapsed() < end {
                for _ in 0..256 {
                    errnos.see(bind_errno(&sock, &sa));
                }
                n += 256;
            }
            let ns = t.elapsed().as_nanos() as u64;
            Ok(errnos.reply(ns, n))
        }
        "setuid" => {
            // Becomes a user (uid and gid `uid`, no supplementary groups), as a login session's
            // processes are: the worker was started as root, already in the user's subtree.
            let uid = field(req, "uid")? as u32;
            // SAFETY: plain syscalls, in the order that works (groups, gid, uid). The worker has
            // one thread.
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    bail!("dropping to uid {uid}: {}", io::Error::last_os_error());
                }
                // A change of credentials clears the parent-death signal: set it again.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            }
            // SAFETY: getuid has no preconditions.
            Ok(json!({ "uid": unsafe { libc::getuid() } }))
        }
        "mkdirs" => {
            // `n` cgroups DIR/PREFIX0 .. DIR/PREFIX(n-1), made by this process (as its user).
            let dir = PathBuf::from(req["dir"].as_str().context("no dir")?);
            let prefix = req["prefix"].as_str().unwrap_or_default();
            let n = field(req, "n")?;
            for i in 0..n {
                let d = dir.join(format!("{prefix}{i}"));
                std::fs::create_dir(&d).with_context(|| format!("mkdir {}", d.display()))?;
            }
            Ok(json!({ "made": n }))
        }
        "hop" => {
            // What a user who makes cgroups as fast as it likes does: makes DIR and DIR/0 ..
            // DIR/n-1, moves itself into each in turn and binds PORT once from it (a fresh socket
            // each, closed at once). The reply counts the binds' errnos as a batch does.
            let dir = PathBuf::from(req["dir"].as_str().context("no dir")?);
            let port = field(req, "port")? as u16;
            let n = field(req, "n")?;
            let sa = sockaddr4(port);
            std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            let mut errnos = Errnos::default();
            let t = Instant::now();
            for i in 0..n {
                let d = dir.join(i.to_string());
                std::fs::create_dir(&d).with_context(|| format!("mkdir {}", d.display()))?;
                std::fs::write(d.join("cgroup.procs"), "0")
                    .with_context(|| format!("moving into {}", d.display()))?;
                errnos.see(bind_errno(&tcp4_socket()?, &sa));
            }
            Ok(errnos.reply(t.elapsed().as_nanos() as u64, n))
        }
        "comm" => {
            // The command name the denial events carry (this process has one thread).
            let name = CString::new(req["name"].as_str().context("no name")?)?;
            // SAFETY: PR_SET_NAME reads a NUL-terminated string (the kernel keeps 15 bytes).
            if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) } != 0 {
                bail!("prctl(PR_SET_NAME): {}", io::Error::last_os_error());
            }
            let comm = std::fs::read_to_string("/proc/self/comm")?;
            Ok(json!({ "comm": comm.trim_end() }))
        }
        other => bail!("unknown op {other:?}"),
    }
}

/// Runs `bind_once` (which returns bind()'s errno, 0 for success) `n` times and times the whole
/// batch: the reply has the time, the first errno, and how many binds returned another one.
fn timed_binds(n: u64, mut bind_once: impl FnMut() -> Result<i32>) -> Result<Value> {
    let mut errnos = Errnos::default();
    let t = Instant::now();
    for _ in 0..n {
        errnos.see(bind_once()?);
    }
    let ns = t.elapsed().as_nanos() as u64;
    Ok(errnos.reply(ns, n))
}

/// What a batch of binds returned: the first errno (0 for success), how many returned another,
/// and the first of those others.
#[derive(Default)]
struct Errnos {
    first: Option<i32>,
    other: u64,
    other_errno: Option<i32>,
}

impl Errnos {
    fn reply(&self, ns: u64, n: u64) -> Value {
        json!({
            "ns": ns, "n": n, "errno": self.first.unwrap_or(0), "other": self.other,
            "other_errno": self.other_errno,
        })
    }

    #[inline(always)]
    fn see(&mut self, e: i32) {
        match self.first {
            None => self.first = Some(e),
            Some(f) if f != e => {
                self.other += 1;
                self.other_errno.get_or_insert(e);
            }
            Some(_) => {}
        }
    }
}

fn open_maps<'a>(state: &'a mut State, pin: &PathBuf) -> Result<&'a mut Maps> {
    if state.maps.as_ref().map(|(p, _)| p != pin).unwrap_or(true) {
        let maps = Maps::open(&PinDir::new(pin))
            .with_context(|| format!("opening the maps at {}", pin.display()))?;
        state.maps = Some((pin.clone(), maps));
    }
    Ok(&mut state.maps.as_mut().expect("just set").1)
}

fn tcp4_socket() -> Result<Socket> {
    // socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), nothing more.
    Socket::new(Domain::IPV4, Type::STREAM, None).context("socket")
}

/// 0.0.0.0:`port`.
fn sockaddr4(port: u16) -> SockAddr {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into()
}

/// bind(2), one syscall; 0 or the errno.
#[inline(always)]
fn bind_errno(sock: &Socket, sa: &SockAddr) -> i32 {
    match sock.bind(sa) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}
