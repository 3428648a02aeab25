//! Prometheus metrics: `--metrics-listen ADDR` serves `GET /metrics` in the text exposition
//! format (prometheus-client encodes it). Kernel counters are read at scrape time; the daemon's
//! own counts live in [`DaemonStats`].

use std::{io, net::SocketAddr, time::Duration};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::guard::{GuardError, Maps, PinDir};

/// What the daemon counts itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct DaemonStats {
    pub leases_reaped: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub denial_lines_suppressed: u64,
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
pub fn render(maps: &Maps, pin: &PinDir, stats: &DaemonStats) -> Result<String, GuardError> {
    let mut reg = Registry::with_prefix("port_guard");
    let denied = Family::<RangeLabels, Counter>::default();
    let audited = Family::<RangeLabels, Counter>::default();
    let allowed = Family::<RangeLabels, Counter>::default();
    for (slot, def) in maps.ranges()? {
        let range = if def.first == def.last {
            def.first.to_string()
        } else {
            format!("{}-{}", def.first, def.last)
        };
        let c = maps.counters(slot)?;
        for (i, protocol) in ["tcp", "udp"].into_iter().enumerate() {
            if def.protocols & (1 << i) == 0 {
                continue;
            }
            let labels = RangeLabels {
                range: range.clone(),
                protocol: protocol.into(),
            };
            allowed.get_or_create(&labels).inc_by(c[i][0]);
            denied.get_or_create(&labels).inc_by(c[i][1]);
            audited.get_or_create(&labels).inc_by(c[i][2]);
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
    let leases = Gauge::<i64>::default();
    leases.set(maps.leases()?.len() as i64);
    reg.register("leases", "Ports leased now", leases);
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    let (allocations, exhaustions) = maps.alloc.totals();
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
        "Leases ended because their cgroup emptied or went away",
        counter(stats.leases_reaped),
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
        "Denial log lines dropped by the rate limit (the kernel counters have them all)",
        counter(stats.denial_lines_suppressed),
    );
    let attached = Gauge::<i64>::default();
    attached.set(pin.has_links().into());
    reg.register(
        "attached",
        "1 while the guard's programs are attached",
        attached,
    );
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    Ok(out)
}

/// A scrape asks the daemon loop, which owns the maps, for the text.
pub type Scrape = oneshot::Sender<String>;

/// Serves `GET /metrics` on `addr`, forwarding each scrape to the daemon loop through `tx`.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Scrape>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut used = 0;
            // Read the request head (bounded in size and time).
            let head = tokio::time::timeout(Duration::from_secs(5), async {
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
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
