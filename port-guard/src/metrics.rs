//! Prometheus metrics: `--metrics-listen ADDR` serves `GET /metrics` in the text exposition
//! format (prometheus-client encodes it). Kernel counters are read at scrape time; the daemon's
//! own counts live in [`DaemonStats`].
//!
//! Anyone who can reach the address can connect, so what a connection can cost is bounded: at
//! most [`MAX_CONNECTIONS`] are served at once (the rest wait in the kernel's listen backlog,
//! holding no fd of the daemon's), each gets [`REQUEST_TIMEOUT`] to send its request and as long
//! to take the answer, and accept errors back off instead of spinning.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, Semaphore},
};

use crate::maps::{Maps, MapsError};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a connection has to send its request head, and again to take the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the daemon counts itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct DaemonStats {
    pub leases_reaped: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Denial lines not written on their own (summarised by offender instead).
    pub denial_lines_summarised: u64,
    /// Times the sysctl lost reserved ports and the daemon put them back.
    pub ephemeral_repairs: u64,
    /// The last look at the sysctl found an error (it could not be read or put back).
    pub ephemeral_check_failed: bool,
    /// `protect_ephemeral` is on.
    pub ephemeral_on: bool,
    /// Pins put back after they vanished.
    pub pins_restored: u64,
    /// The daemon's links are attached.
    pub attached: bool,
    /// Where refusals go through the sentinel port: the guarded netns where the daemon holds
    /// it, and those where it cannot (taken by another socket).
    pub sentinel: Option<SentinelCounts>,
}

/// Netns with and without the sentinel held.
#[derive(Debug, Default, Clone, Copy)]
pub struct SentinelCounts {
    pub held: u64,
    pub missing: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RangeLabels {
    range: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// Renders every metric in the text exposition format.
pub fn render(maps: &Maps, stats: &DaemonStats) -> Result<String, MapsError> {
    let mut reg = Registry::with_prefix("port_guard");
    let denied = Family::<RangeLabels, Counter>::default();
    let unguarded = Family::<RangeLabels, Counter>::default();
    let audited = Family::<RangeLabels, Counter>::default();
    let allowed = Family::<RangeLabels, Counter>::default();
    for r in maps.ranges() {
        let c = maps.counters(r.slot)?;
        for (protocol, counts) in c.by_protocol(r.spec.protocols) {
            let labels = RangeLabels {
                range: r.spec.range.to_string(),
                protocol: protocol.into(),
            };
            allowed.get_or_create(&labels).inc_by(counts.allowed);
            let (ut, uu) = maps.unguarded(r.slot)?;
            unguarded
                .get_or_create(&labels)
                .inc_by(if protocol == "udp" { uu } else { ut });
            denied.get_or_create(&labels).inc_by(counts.denied);
            audited.get_or_create(&labels).inc_by(counts.audited);
        }
    }
    reg.register(
        "denied_binds",
        "Binds the guard refused, by range and protocol",
        denied,
    );
    reg.register(
        "audited_binds",
        "Binds audit mode would have refused, by range and protocol",
        audited,
    );
    reg.register(
        "allowed_reserved_binds",
        "Binds of reserved ports by allowed cgroups or lessees, by range and protocol",
        allowed,
    );
    reg.register(
        "unguarded_netns_binds",
        "Binds of reserved ports let through because their network namespace is not guarded, by range and protocol",
        unguarded,
    );
    let guarded = Gauge::<i64>::default();
    guarded.set(if maps.settings()?.netns_scoped {
        maps.guarded_netns()?.len() as i64
    } else {
        -1
    });
    reg.register(
        "guarded_netns",
        "Network namespaces the guard enforces in (-1: every one)",
        guarded,
    );
    let leases = Gauge::<i64>::default();
    leases.set(maps.leases().all()?.len() as i64);
    reg.register("leases", "Ports leased now", leases);
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    let (allocations, exhaustions) = maps.leases().totals();
    reg.register(
        "lease_allocations",
        "Leases made by spawn and lease",
        counter(allocations),
    );
    reg.register(
        "lease_exhaustions",
        "Lease requests refused because every port was leased or bound",
        counter(exhaustions),
    );
    reg.register(
        "denial_events_lost",
        "Denials the kernel counted but could not report (event ring buffer full)",
        counter(maps.events_lost()?),
    );
    reg.register(
        "leases_reaped",
        "Leases this daemon ended because their cgroup emptied or went away or their TTL ran out",
        counter(stats.leases_reaped),
    );
    let ended = Family::<CauseLabels, Counter>::default();
    for (how, n) in crate::leases::Ended::ALL.iter().zip(maps.leases().ended()) {
        ended
            .get_or_create(&CauseLabels {
                cause: how.label().into(),
            })
            .inc_by(n);
    }
    reg.register(
        "leases_ended",
        "Leases ended since the guard was first loaded, by cause: released (port-guard release), cgroup_removed, emptied (spawn and --until-empty leases), expired (TTL)",
        ended,
    );
    let reloads = Family::<ResultLabels, Counter>::default();
    reloads
        .get_or_create(&ResultLabels {
            result: "ok".into(),
        })
        .inc_by(stats.reloads_ok);
    reloads
        .get_or_create(&ResultLabels {
            result: "error".into(),
        })
        .inc_by(stats.reloads_failed);
    reg.register(
        "config_reloads",
        "SIGHUP config reloads, by result",
        reloads,
    );
    reg.register(
        "denial_log_lines_suppressed",
        "Denials that got no log line of their own (a flooding offender's, summarised as N more denials by it); the kernel counters have them all",
        counter(stats.denial_lines_summarised),
    );
    reg.register(
        "ephemeral_repairs",
        "Times net.ipv4.ip_local_reserved_ports lost reserved ports (rewritten by something else) and the daemon put them back",
        counter(stats.ephemeral_repairs),
    );
    let protected = Gauge::<i64>::default();
    protected.set((stats.ephemeral_on && !stats.ephemeral_check_failed).into());
    reg.register(
        "ephemeral_protected",
        "1 while protect_ephemeral is on and net.ipv4.ip_local_reserved_ports holds the reserved ports (as of the last look, every 3 s); 0 when it is off or the sysctl could not be read or put back",
        protected,
    );
    reg.register(
        "pins_restored",
        "Pins of the guard that vanished while its links were attached and were pinned again",
        counter(stats.pins_restored),
    );
    let attached = Gauge::<i64>::default();
    attached.set(stats.attached.into());
    reg.register(
        "attached",
        "1 while the guard's programs are attached",
        attached,
    );
    if let Some(c) = stats.sentinel {
        let netns = Family::<StateLabels, Gauge>::default();
        for (state, n) in [("held", c.held), ("missing", c.missing)] {
            netns
                .get_or_create(&StateLabels {
                    state: state.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        reg.register(
            "sentinel_netns",
            "Guarded network namespaces where the daemon holds the sentinel port (held), so that refused binds get EADDRINUSE on a kernel without bpf_set_retval, and where another socket holds it (missing: refused binds there get EPERM)",
            netns,
        );
    }
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    Ok(out)
}

/// A scrape asks the daemon loop, which owns the maps, for the text.
pub type Scrape = oneshot::Sender<String>;

/// Listens on `addr` (before anything is loaded: a busy address fails the start cleanly).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` on `listener`, forwarding each scrape to the daemon loop through `tx`.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Scrape>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(10);
    loop {
        // A free slot before accepting: while all are busy, new connections wait in the
        // kernel's backlog and cost the daemon nothing.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((conn, _)) => {
                backoff = Duration::from_millis(10);
                let tx = tx.clone();
                tokio::spawn(async move {
                    answer(conn, tx).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // EMFILE and friends: waiting is the only cure; spinning would eat a CPU.
                log::warn!("metrics: accepting a connection: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Reads one request head and answers it; every step is bounded in size and time.
async fn answer(mut conn: TcpStream, tx: mpsc::Sender<Scrape>) {
    let mut buf = vec![0u8; 8192];
    let mut used = 0;
    let head = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while used < buf.len() {
            let n = conn.read(&mut buf[used..]).await.ok()?;
            if n == 0 {
                return None;
            }
            used += n;
            if buf[..used].windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(());
            }
        }
        None
    })
    .await;
    if !matches!(head, Ok(Some(()))) {
        return;
    }
    let line = String::from_utf8_lossy(&buf[..used])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) =
        if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
            let (reply, rx) = oneshot::channel();
            let body = match tx.send(reply).await {
                Ok(()) => rx.await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            )
        } else {
            ("404 Not Found", "text/plain", "try /metrics\n".to_owned())
        };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let _ = conn.write_all(resp.as_bytes()).await;
        let _ = conn.shutdown().await;
    })
    .await;
}
