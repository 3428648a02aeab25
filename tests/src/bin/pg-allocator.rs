//! Another port allocator on the host, the way most of them work (a GlusterFS brick, a service
//! that picks "a free port"): probe the lowest free port of FIRST..=LAST by binding it, let go,
//! bind it for real a moment later (MOMENT_MS), hold it for HOLD_MS, let go, wait GAP_MS with
//! nothing held, start over. The probe is libvirt's own (`virPortAllocatorBindToPort`):
//! SO_REUSEADDR, the IPv6 wildcard with IPV6_V6ONLY, then the IPv4 wildcard; the real bind is a
//! dual-stack listener on `[::]:PORT` with SO_REUSEADDR, as servers do. When no port is free it
//! waits RETRY_MS (default GAP_MS) and probes again, for as long as it runs.
//!
//! Usage: pg-allocator FIRST LAST MOMENT_MS HOLD_MS GAP_MS [RETRY_MS]. HOLD_MS 0 holds the first
//! port it gets until it is stopped (and allocates nothing more). SIGTERM ends it; it prints one JSON
//! line: binds (every bind() call), refused (failed bind() calls by errno), scans (searches
//! for a free port), scans_without_free_port, grabbed (ports held), lost (a probe found the port
//! free but the real bind failed: someone took it in between), ports (the distinct ports held).
//! It prints `ready` on stderr once its first scan is done.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use integration_tests::sock;
use socket2::Socket;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

#[derive(Default)]
struct Stats {
    binds: u64,
    refused: BTreeMap<i32, u64>,
    scans: u64,
    scans_without_free_port: u64,
    grabbed: u64,
    lost: u64,
    ports: BTreeSet<u16>,
}

/// A bound (and with `listen`, listening) socket on `addr`, or the errno. Only bind()
/// failures are counted; `v6only` applies to IPv6 sockets.
fn bind(stats: &mut Stats, addr: SocketAddr, v6only: bool, listen: bool) -> Result<Socket, i32> {
    let opts = sock::Tcp {
        reuseaddr: true,
        v6only,
        listen: listen.then_some(16),
    };
    match sock::tcp(addr, opts) {
        Ok(s) => {
            stats.binds += 1;
            Ok(s)
        }
        Err((step, e)) => {
            if step != sock::Step::Socket {
                stats.binds += 1;
            }
            if step == sock::Step::Bind {
                *stats.refused.entry(e).or_default() += 1;
            }
            Err(e)
        }
    }
}

/// libvirt's probe: free when both wildcards bind.
fn probe(stats: &mut Stats, port: u16) -> bool {
    let Ok(v6) = bind(
        stats,
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        true,
        false,
    ) else {
        return false;
    };
    let v4 = bind(
        stats,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        false,
        false,
    );
    drop(v6);
    v4.is_ok()
}

/// Sleeps up to `ms`, returning early when stopped.
fn pause(ms: u64) {
    let until = Instant::now() + Duration::from_millis(ms);
    while !STOP.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

fn main() {
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
    const USAGE: &str = "usage: pg-allocator FIRST LAST MOMENT_MS HOLD_MS GAP_MS [RETRY_MS]";
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect(USAGE))
        .collect();
    let (first, last, moment, hold, gap, retry) = match args[..] {
        [f, l, m, h, g] => (f, l, m, h, g, g),
        [f, l, m, h, g, r] => (f, l, m, h, g, r),
        _ => panic!("{USAGE}"),
    };
    let (first, last) = (
        u16::try_from(first).expect(USAGE),
        u16::try_from(last).expect(USAGE),
    );
    let mut stats = Stats::default();
    let mut forever: Option<Socket> = None;
    let mut ready = false;
    while !STOP.load(Ordering::Relaxed) {
        if forever.is_some() {
            pause(50);
            continue;
        }
        stats.scans += 1;
        let free = (first..=last).find(|p| probe(&mut stats, *p));
        if !ready {
            eprintln!("ready");
            ready = true;
        }
        let Some(port) = free else {
            stats.scans_without_free_port += 1;
            pause(retry.max(1));
            continue;
        };
        pause(moment);
        match bind(
            &mut stats,
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            false,
            true,
        ) {
            Ok(s) => {
                stats.grabbed += 1;
                stats.ports.insert(port);
                if hold == 0 {
                    forever = Some(s);
                    continue;
                }
                pause(hold);
                drop(s);
            }
            Err(_) => stats.lost += 1,
        }
        pause(gap);
    }
    let refused: BTreeMap<String, u64> = stats
        .refused
        .into_iter()
        .map(|(e, n)| (e.to_string(), n))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "binds": stats.binds,
            "refused": refused,
            "scans": stats.scans,
            "scans_without_free_port": stats.scans_without_free_port,
            "grabbed": stats.grabbed,
            "lost": stats.lost,
            "ports": stats.ports,
        })
    );
}
