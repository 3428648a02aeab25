//! `port-guard-bench worker`: the measuring process. The orchestrator starts one per scenario,
//! already moved into the scenario's cgroup, and sends it one JSON request per line on stdin; it
//! answers one JSON line on stdout. Timed loops run here and nowhere else, so nothing but the
//! syscalls under test sits between the two clock reads.

use std::{
    io::{self, BufRead as _, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use port_guard::{
    guard::{Maps, PinDir},
    leases,
    policy::Protocols,
};
use serde_json::{json, Value};

#[derive(Default)]
struct State {
    /// A TCP socket bound once (to a kernel-chosen port): binding it again runs the hook and then
    /// fails with EINVAL in __inet_bind, so the loop measures the hook and the syscall only.
    prebound: Option<OwnedFd>,
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
            let fd = match &state.prebound {
                Some(fd) => fd.as_raw_fd(),
                None => {
                    let fd = tcp4_socket()?;
                    if bind4(fd.as_raw_fd(), 0) != 0 {
                        bail!(
                            "binding the pre-bound socket: {}",
                            io::Error::last_os_error()
                        );
                    }
                    state.prebound.insert(fd).as_raw_fd()
                }
            };
            let sa = sockaddr4(port);
            timed_binds(n, || Ok(bind_sa(fd, &sa)))
        }
        "cycle" => {
            let port = field(req, "port")? as u16;
            let n = field(req, "n")?;
            let sa = sockaddr4(port);
            // SAFETY: plain socket syscalls on an fd closed right after.
            timed_binds(n, || unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    bail!("socket: {}", io::Error::last_os_error());
                }
                let e = bind_sa(fd, &sa);
                libc::close(fd);
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
                let port = leases::allocate(maps, id, level, None)?;
                ns.push(t.elapsed().as_nanos() as u64);
                ports.push(port);
            }
            for p in &ports {
                leases::release(maps, *p)?;
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
                let fd = tcp4_socket()?;
                if bind_sa(fd.as_raw_fd(), &sa) != 0 {
                    refused += 1;
                }
            }
            Ok(json!({ "refused": refused }))
        }
        other => bail!("unknown op {other:?}"),
    }
}

/// Runs `bind_once` (which returns bind()'s errno, 0 for success) `n` times and times the whole
/// batch: the reply has the time, the first errno, and how many binds returned another one.
fn timed_binds(n: u64, mut bind_once: impl FnMut() -> Result<i32>) -> Result<Value> {
    let (mut first, mut other) = (None, 0u64);
    let t = Instant::now();
    for _ in 0..n {
        let e = bind_once()?;
        match first {
            None => first = Some(e),
            Some(f) if f != e => other += 1,
            Some(_) => {}
        }
    }
    let ns = t.elapsed().as_nanos() as u64;
    Ok(json!({ "ns": ns, "n": n, "errno": first.unwrap_or(0), "other": other }))
}

fn open_maps<'a>(state: &'a mut State, pin: &PathBuf) -> Result<&'a mut Maps> {
    if state.maps.as_ref().map(|(p, _)| p != pin).unwrap_or(true) {
        let maps = Maps::open(&PinDir::new(pin))
            .with_context(|| format!("opening the maps at {}", pin.display()))?;
        state.maps = Some((pin.clone(), maps));
    }
    Ok(&mut state.maps.as_mut().expect("just set").1)
}

fn tcp4_socket() -> Result<OwnedFd> {
    // SAFETY: socket returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", io::Error::last_os_error());
    }
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr4(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::UNSPECIFIED).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// bind(2); 0 or the errno.
#[inline(always)]
fn bind_sa(fd: i32, sa: &libc::sockaddr_in) -> i32 {
    // SAFETY: a valid sockaddr_in and its size.
    let r = unsafe {
        libc::bind(
            fd,
            (sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if r == 0 {
        0
    } else {
        io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

fn bind4(fd: i32, port: u16) -> i32 {
    bind_sa(fd, &sockaddr4(port))
}
