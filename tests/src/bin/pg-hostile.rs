//! A hostile port grabber for the integration tests: for DURATION_MS it tries to bind and listen
//! on every port of FIRST..=LAST (tcp, v4 and v6 wildcards), holds what it gets for HOLD_MS, lets
//! go and starts over, the way another allocator (a GlusterFS brick, say) would race libvirt.
//! Prints one JSON line: attempts, grabbed, and refusals by errno.
//!
//! Usage: pg-hostile FIRST LAST DURATION_MS HOLD_MS [GAP_MS] (SIGTERM ends it early). GAP_MS
//! is a pause with nothing held between rounds (default 0), leaving windows a
//! detect-then-bind allocator can see a free port in and lose it again.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use integration_tests::sock;
use socket2::Socket;

fn grab(addr: SocketAddr) -> Result<Socket, i32> {
    let opts = sock::Tcp {
        reuseaddr: false,
        v6only: true,
        listen: Some(1),
    };
    sock::tcp(addr, opts).map_err(|(_, e)| e)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    // SIGTERM ends the run early and still prints the summary.
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("usage: pg-hostile FIRST LAST DURATION_MS HOLD_MS [GAP_MS]")
        })
        .collect();
    let (first, last, duration, hold, gap) = match args[..] {
        [f, l, d, h] => (f, l, d, h, 0),
        [f, l, d, h, g] => (f, l, d, h, g),
        _ => panic!("usage: pg-hostile FIRST LAST DURATION_MS HOLD_MS [GAP_MS]"),
    };
    let deadline = Instant::now() + Duration::from_millis(duration);
    let (mut attempts, mut grabbed) = (0u64, 0u64);
    let mut refused: BTreeMap<i32, u64> = BTreeMap::new();
    while Instant::now() < deadline && !STOP.load(Ordering::Relaxed) {
        let mut held = Vec::new();
        for port in first as u16..=last as u16 {
            for addr in [
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            ] {
                attempts += 1;
                match grab(addr) {
                    Ok(s) => {
                        grabbed += 1;
                        held.push(s);
                    }
                    Err(e) => *refused.entry(e).or_default() += 1,
                }
            }
        }
        std::thread::sleep(Duration::from_millis(if held.is_empty() {
            1
        } else {
            hold
        }));
        drop(held);
        if gap > 0 {
            std::thread::sleep(Duration::from_millis(gap));
        }
    }
    let refused: BTreeMap<String, u64> = refused
        .into_iter()
        .map(|(e, n)| (e.to_string(), n))
        .collect();
    println!(
        "{}",
        serde_json::json!({ "attempts": attempts, "grabbed": grabbed, "refused": refused })
    );
}
