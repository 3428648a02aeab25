//! Prometheus metrics, in the text exposition format, from one table of families: what the
//! kernel holds (read from the maps: the pins alone are enough, so `status --prometheus` renders
//! it while no daemon runs) and what the daemon counts itself ([`DaemonStats`]).
//!
//! Where they go: `metrics_listen` serves `GET /metrics` on a TCP or a unix socket ([`serve`]);
//! `metrics_textfile` writes the same text into a file for node_exporter's textfile collector
//! every few seconds ([`textfile`]), as does `port-guard status --prometheus --textfile` (the
//! shipped timer) while the daemon is down. Every writer renders the same families the same way,
//! so a fleet that scrapes one or reads the other sees one set of series.

mod serve;
pub mod textfile;

use port_guard_common::{Proto, REASONS};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub use self::serve::{bind, serve, Endpoint, Listener, Scrape, MAX_CONNECTIONS, REQUEST_TIMEOUT};
use crate::maps::{Maps, MapsError};

/// What the daemon counts itself; written to the state dir every few seconds so that
/// `status --prometheus` shows the last values while no daemon runs.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(default)]
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
    /// Metrics connections closed to make room for a new one (all slots were held).
    pub metrics_evicted: u64,
}

/// Whether a family counts up or goes up and down.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// One family of the exposition: name (without `port_guard_`, and without `_total` for a
/// counter), help, kind, and its samples (label pairs, value).
struct Metric {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Vec<(&'static str, String)>, i64)>,
}

impl Metric {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Metric {
        Metric {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn with(mut self, labels: Vec<(&'static str, String)>, value: u64) -> Metric {
        self.samples
            .push((labels, i64::try_from(value).unwrap_or(i64::MAX)));
        self
    }

    fn one(self, value: u64) -> Metric {
        self.with(Vec::new(), value)
    }
}

fn counter(name: &'static str, help: &'static str) -> Metric {
    Metric::new(name, Kind::Counter, help)
}

fn gauge(name: &'static str, help: &'static str) -> Metric {
    Metric::new(name, Kind::Gauge, help)
}

/// The exposition: the kernel's families, then the daemon's. `daemon` is None when no daemon
/// runs (then its counters are the last it wrote, `last`, if any).
pub fn render(
    maps: &Maps,
    attached: bool,
    daemon: Option<&DaemonStats>,
    last: Option<&DaemonStats>,
) -> Result<String, MapsError> {
    let mut all = kernel(maps, attached)?;
    all.extend(daemon_families(daemon, last));
    Ok(encode_all(all))
}

fn encode_all(metrics: Vec<Metric>) -> String {
    let mut reg = Registry::with_prefix("port_guard");
    for m in metrics {
        let labelled = |labels: Vec<(&'static str, String)>| -> Vec<(String, String)> {
            labels.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
        };
        match m.kind {
            Kind::Counter => {
                let f = Family::<Vec<(String, String)>, Counter>::default();
                for (labels, v) in m.samples {
                    f.get_or_create(&labelled(labels))
                        .inc_by(u64::try_from(v).unwrap_or(0));
                }
                reg.register(m.name, m.help, f);
            }
            Kind::Gauge => {
                let f = Family::<Vec<(String, String)>, Gauge>::default();
                for (labels, v) in m.samples {
                    f.get_or_create(&labelled(labels)).set(v);
                }
                reg.register(m.name, m.help, f);
            }
        }
    }
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// `range` and `protocol` labels.
fn range_labels(range: &str, protocol: &str) -> Vec<(&'static str, String)> {
    vec![
        ("range", range.to_owned()),
        ("protocol", protocol.to_owned()),
    ]
}

/// What the maps hold: counters by range, refusals by reason, shares, leases, the guard's state.
fn kernel(maps: &Maps, attached: bool) -> Result<Vec<Metric>, MapsError> {
    let mut out = range_metrics(maps)?;
    out.extend(share_metrics(maps)?);
    out.extend(lease_metrics(maps)?);
    out.extend(guard_metrics(maps, attached)?);
    Ok(out)
}

fn range_metrics(maps: &Maps) -> Result<Vec<Metric>, MapsError> {
    let mut denied = counter(
        "denied_binds",
        "Binds the guard refused, by range and protocol",
    );
    let mut audited = counter(
        "audited_binds",
        "Binds audit mode would have refused, by range and protocol",
    );
    let mut allowed = counter(
        "allowed_reserved_binds",
        "Binds of reserved ports by allowed cgroups or lessees, by range and protocol",
    );
    let mut unguarded = counter(
        "unguarded_netns_binds",
        "Binds of reserved ports let through because their network namespace is not guarded, by range and protocol",
    );
    let mut reasons = counter(
        "refusals",
        "Binds refused (in audit mode: that would have been) by range, protocol and reason: not_allowed (no allowed cgroup above the caller), leased (leased to another cgroup), limit (the caller's unit held its per-child limit)",
    );
    for r in maps.ranges() {
        let range = r.spec.range.to_string();
        let c = maps.counters(r.slot)?;
        let (ut, uu) = maps.unguarded(r.slot)?;
        for proto in Proto::ALL
            .into_iter()
            .filter(|p| p.in_set(r.spec.protocols.0))
        {
            let (counts, u) = match proto {
                Proto::Tcp => (c.tcp, ut),
                Proto::Udp => (c.udp, uu),
            };
            let l = || range_labels(&range, proto.name());
            allowed = allowed.with(l(), counts.allowed);
            unguarded = unguarded.with(l(), u);
            denied = denied.with(l(), counts.denied);
            audited = audited.with(l(), counts.audited);
            if maps.has_shares() {
                let by = maps.reasons(r.slot, proto)?;
                for (reason, n) in ["not_allowed", "leased", "limit"]
                    .into_iter()
                    .zip(by)
                    .take(REASONS as usize)
                {
                    let mut labels = l();
                    labels.push(("reason", reason.to_owned()));
                    reasons = reasons.with(labels, n);
                }
            }
        }
    }
    Ok(vec![denied, audited, allowed, unguarded, reasons])
}

/// The per-child limits and the shares held now, per limited range.
fn share_metrics(maps: &Maps) -> Result<Vec<Metric>, MapsError> {
    let limits = maps.limits()?;
    let shares = crate::maps::by_slot(&maps.shares()?);
    let mut limit = gauge(
        "per_child_limit",
        "The most sockets on a range's ports one child of an allowed cgroup (a VM) may hold, by range (limited ranges only)",
    );
    let mut max = gauge(
        "share_max",
        "The most sockets on a limited range's ports that one unit (a VM) holds now",
    );
    let mut at_limit = gauge(
        "units_at_limit",
        "Units (VMs) holding as many sockets on a limited range's ports as its per-child limit allows, now",
    );
    for r in maps.ranges() {
        let n = limits[r.slot as usize];
        if n == 0 {
            continue;
        }
        let held: Vec<u64> = shares
            .get(&r.slot)
            .into_iter()
            .flatten()
            .map(|(_, h)| *h)
            .collect();
        let l = || vec![("range", r.spec.range.to_string())];
        limit = limit.with(l(), n.into());
        max = max.with(l(), held.iter().copied().max().unwrap_or(0));
        at_limit = at_limit.with(
            l(),
            held.iter().filter(|h| **h >= u64::from(n)).count() as u64,
        );
    }
    Ok(vec![limit, max, at_limit])
}

fn lease_metrics(maps: &Maps) -> Result<Vec<Metric>, MapsError> {
    let leases = maps.leases();
    let t = leases.totals();
    let mut ended = counter(
        "leases_ended",
        "Leased ports whose lease ended since the guard was first loaded, by cause: released (port-guard release), cgroup_removed, emptied (spawn and --until-empty leases), expired (TTL)",
    );
    for (how, n) in crate::leases::Ended::ALL.iter().zip(leases.ended()) {
        ended = ended.with(vec![("cause", how.label().to_owned())], n);
    }
    Ok(vec![
        gauge("leases", "Ports leased now").one(leases.all()?.len() as u64),
        counter(
            "lease_allocations",
            "Ports leased by spawn and lease since the guard was first loaded (a --count N request leases N)",
        )
        .one(t.ports),
        counter(
            "lease_requests",
            "Requests of spawn and lease that got their ports",
        )
        .one(t.requests),
        counter(
            "lease_exhaustions",
            "Requests of spawn and lease refused because too few ports of the ranges were free",
        )
        .one(t.exhaustions),
        ended,
    ])
}

/// The guard as a whole: attached, mode, netns, sentinels, lost events, evicted offenders.
fn guard_metrics(maps: &Maps, attached: bool) -> Result<Vec<Metric>, MapsError> {
    let settings = maps.settings()?;
    let guarded = if settings.netns_scoped {
        maps.guarded_netns()?.len() as i64
    } else {
        -1
    };
    let mut netns = gauge(
        "guarded_netns",
        "Network namespaces the guard enforces in (-1: every one)",
    );
    netns.samples.push((Vec::new(), guarded));
    let mut mode = gauge("mode", "1 for the mode the guard is in (enforce or audit)");
    for m in ["enforce", "audit"] {
        mode = mode.with(
            vec![("mode", m.to_owned())],
            (settings.mode.name() == m).into(),
        );
    }
    let mut out = vec![
        gauge("attached", "1 while the guard's programs are attached").one(attached.into()),
        mode,
        netns,
        counter(
            "denial_events_lost",
            "Denials the kernel counted but could not report (event ring buffer full)",
        )
        .one(maps.events_lost()?),
        counter(
            "offenders_evicted",
            "Offenders (uids, root's cgroups) and users' cgroups the kernel's event budget maps forgot to make room for new ones (their summaries lose what was not logged)",
        )
        .with(vec![("map", "offenders".into())], maps.evicted()?.0)
        .with(vec![("map", "cgroups".into())], maps.evicted()?.1),
    ];
    if settings.sentinel {
        let (held, missing) = maps.sentinel_netns()?;
        out.push(
            gauge(
                "sentinel_netns",
                "Guarded network namespaces where a sentinel holds its port (held), so that refused binds get EADDRINUSE on a kernel without bpf_set_retval, and where none does (missing: refused binds there get EPERM)",
            )
            .with(vec![("state", "held".into())], held)
            .with(vec![("state", "missing".into())], missing),
        );
    }
    Ok(out)
}

/// What the daemon counts: live when it runs (`daemon`), else the last values it wrote (`last`,
/// counters only: a daemon that is not running repairs and restores nothing).
fn daemon_families(daemon: Option<&DaemonStats>, last: Option<&DaemonStats>) -> Vec<Metric> {
    let up = daemon.is_some();
    let mut out = vec![gauge(
        "daemon_up",
        "1 while the port-guard daemon of these pins runs (its record names a live process)",
    )
    .one(up.into())];
    let Some(s) = daemon.or(last) else {
        return out;
    };
    out.extend([
        counter(
            "leases_reaped",
            "Leases the daemon ended because their cgroup emptied or went away or their TTL ran out",
        )
        .one(s.leases_reaped),
        counter("config_reloads", "SIGHUP config reloads, by result")
            .with(vec![("result", "ok".into())], s.reloads_ok)
            .with(vec![("result", "error".into())], s.reloads_failed),
        counter(
            "denial_log_lines_suppressed",
            "Denials that got no log line of their own (a flooding offender's, summarised as N more denials by it); the kernel counters have them all",
        )
        .one(s.denial_lines_summarised),
        counter(
            "ephemeral_repairs",
            "Times net.ipv4.ip_local_reserved_ports lost reserved ports (rewritten by something else) and the daemon put them back",
        )
        .one(s.ephemeral_repairs),
        counter(
            "pins_restored",
            "Pins of the guard that vanished while its links were attached and were pinned again",
        )
        .one(s.pins_restored),
        counter(
            "metrics_connections_evicted",
            "Idle metrics connections closed to make room for a new one (every slot was held)",
        )
        .one(s.metrics_evicted),
    ]);
    out.push(
        gauge(
            "ephemeral_protected",
            "1 while protect_ephemeral is on and net.ipv4.ip_local_reserved_ports holds the reserved ports (as of the last look, every 3 s, by a running daemon); 0 when it is off, could not be read or put back, or no daemon watches it",
        )
        .one((up && s.ephemeral_on && !s.ephemeral_check_failed).into()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_encodes_counters_with_total_and_gauges_without() {
        let text = encode_all(vec![
            counter("denied_binds", "Refused").with(range_labels("1-2", "tcp"), 3),
            gauge("attached", "Attached").one(1),
        ]);
        assert!(
            text.contains("# TYPE port_guard_denied_binds counter"),
            "{text}"
        );
        assert!(
            text.contains("port_guard_denied_binds_total{range=\"1-2\",protocol=\"tcp\"} 3"),
            "{text}"
        );
        assert!(text.contains("port_guard_attached 1"), "{text}");
    }

    #[test]
    fn a_daemon_that_is_not_running_is_said_so_and_repairs_nothing() {
        let last = DaemonStats {
            reloads_ok: 4,
            ephemeral_on: true,
            ..DaemonStats::default()
        };
        let text = encode_all(daemon_families(None, Some(&last)));
        assert!(text.contains("port_guard_daemon_up 0"), "{text}");
        assert!(
            text.contains("port_guard_config_reloads_total{result=\"ok\"} 4"),
            "{text}"
        );
        assert!(text.contains("port_guard_ephemeral_protected 0"), "{text}");
        let text = encode_all(daemon_families(Some(&last), None));
        assert!(text.contains("port_guard_daemon_up 1"), "{text}");
        assert!(text.contains("port_guard_ephemeral_protected 1"), "{text}");
    }
}
