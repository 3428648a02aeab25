//! Phase 2, the agent: load + attach time of the small and the large configuration, the daemon's
//! memory after start, after 10,000 denials and with 10,000 leases, and its idle CPU; and the
//! "agent" rows of the table (written last, with the CPU of the bind() rounds).

use anyhow::{bail, Result};
use port_guard::{maps::Maps, pin::PinDir};
use serde_json::json;

use super::{claim, denials_seen, Cgroups, Params, DENIALS, LEASED, LEASES, LEASES_FIRST, REFUSED};
use crate::{
    env::{self, check_interrupted, Daemon, Pins, Worker},
    report::{mib, ms, Report},
    stats::summarize,
};

/// What phase 2 measured, for the rows.
pub(super) struct Figures {
    /// Load + attach (the daemon's own measure) and exec to "guard enforcing", ns: small, large.
    load: [Vec<f64>; 2],
    wall: [Vec<f64>; 2],
    /// (VmRSS, VmHWM) in KiB.
    rss_start: (u64, u64),
    rss_denials: (u64, u64),
    rss_large: (u64, u64),
    /// Denial events the small daemon read of the [`DENIALS`] made.
    /// Denials in the log: (own lines, summarised).
    seen: (u64, u64),
    /// Of one CPU: small, large.
    idle_pct: Vec<f64>,
}

/// The daemons of the small and the large configuration, left running for the bind() rounds.
pub(super) struct Daemons {
    pub small: Daemon,
    pub large: Daemon,
    /// The small configuration refusing through the sentinel port, for phase 3's sentinel row.
    pub sentinel: Daemon,
    /// The small configuration with a per-child limit, for phase 3's limit rows.
    pub limited: Daemon,
}

pub(super) fn measure(
    p: &Params,
    pg: &std::path::Path,
    pins: &Pins,
    cg: &Cgroups,
) -> Result<(Figures, Daemons)> {
    let (small, large) = (&cg.small, &cg.large);
    eprintln!(
        "bench: agent load + attach ({} samples per configuration)",
        p.load_samples + 1
    );
    let mut load = [Vec::new(), Vec::new()];
    let mut wall = [Vec::new(), Vec::new()];
    for i in 0..p.load_samples {
        for (g, l) in [small, large].into_iter().enumerate() {
            check_interrupted()?;
            let d = Daemon::start(
                pg,
                &pins.dir(&format!("load-{}-{i}", l.name)),
                &l.config,
                &cg.daemons,
            )?;
            load[g].push(d.load_attach.as_nanos() as f64);
            wall[g].push(d.start_to_enforcing.as_nanos() as f64);
        }
    }
    let small_d = Daemon::start(pg, &pins.dir("small"), &small.config, &cg.daemons)?;
    let large_d = Daemon::start(pg, &pins.dir("large"), &large.config, &cg.daemons)?;
    for (g, d) in [&small_d, &large_d].into_iter().enumerate() {
        load[g].push(d.load_attach.as_nanos() as f64);
        wall[g].push(d.start_to_enforcing.as_nanos() as f64);
    }
    env::sleep(p.settle)?;
    let rss_start = small_d.memory_kib()?;
    {
        let mut w = Worker::spawn("denials", &small.out)?;
        let r = w.call(&json!({ "op": "deny", "port": REFUSED, "n": DENIALS }))?;
        if r["refused"].as_u64() != Some(DENIALS) {
            bail!(
                "{} of {DENIALS} binds of a reserved port were refused",
                r["refused"]
            );
        }
    }
    // The flood's summary comes within one summary period (5 s).
    env::sleep(p.settle + std::time::Duration::from_secs(6))?;
    let rss_denials = small_d.memory_kib()?;
    let seen = denials_seen(&small_d.log());

    // Leases: one to each lessee cgroup; the large configuration gets 10,000 more.
    {
        let mut m = Maps::open(&PinDir::new(pins.dir("small")))?;
        claim(&mut m, LEASED, &small.lessee)?;
        let mut m = Maps::open(&PinDir::new(pins.dir("large")))?;
        claim(&mut m, LEASED, &large.lessee)?;
        for i in 0..LEASES {
            claim(
                &mut m,
                (u32::from(LEASES_FIRST) + i) as u16,
                &cg.many[i as usize % cg.many.len()],
            )?;
        }
    }
    env::sleep(p.settle)?;
    let rss_large = large_d.memory_kib()?;
    let cpu0 = [small_d.cpu_time(), large_d.cpu_time()];
    env::sleep(p.idle)?;
    let cpu1 = [small_d.cpu_time(), large_d.cpu_time()];
    let idle_pct: Vec<f64> = (0..2)
        .map(|g| 100.0 * (cpu1[g] - cpu0[g]).as_secs_f64() / p.idle.as_secs_f64())
        .collect();
    Ok((
        Figures {
            load,
            wall,
            rss_start,
            rss_denials,
            rss_large,
            seen,
            idle_pct,
        },
        Daemons {
            small: small_d,
            large: large_d,
            sentinel: Daemon::start_env(
                pg,
                &pins.dir("sentinel"),
                &cg.sentinel.config,
                &cg.daemons,
                &[("PORT_GUARD_SENTINEL", "force")],
            )?,
            limited: Daemon::start(pg, &pins.dir("limited"), &cg.limited.config, &cg.daemons)?,
        },
    ))
}

/// The "agent" section; `bind_pct` is the daemons' CPU during the bind() rounds (small, large).
pub(super) fn rows(report: &mut Report, f: &Figures, bind_pct: &[f64]) {
    report.section("agent");
    let ls = summarize(&f.load[0]);
    report.line(
        "load + attach, 1 range (daemon's own measure)",
        ms(ls.median),
        format!("{} starts", ls.n),
        "≤ 100 ms",
        Some(ls.median <= 100e6),
    );
    let ll = summarize(&f.load[1]);
    report.line(
        "load + attach, 64 ranges / 1,000 allowed",
        ms(ll.median),
        format!("{} starts", ll.n),
        "≤ 100 ms",
        Some(ll.median <= 100e6),
    );
    let ws = summarize(&f.wall[0]);
    let wl = summarize(&f.wall[1]);
    report.line(
        "exec to \"guard enforcing\", 1 range / 64 ranges",
        format!("{} / {}", ms(ws.median), ms(wl.median)),
        "",
        "",
        None,
    );
    let (rss_start, rss_denials, rss_large) = (f.rss_start, f.rss_denials, f.rss_large);
    report.line(
        "daemon RSS after start (peak while loading)",
        format!("{} ({})", mib(rss_start.0 as f64), mib(rss_start.1 as f64)),
        "",
        "≤ 16 MiB",
        Some(rss_start.0 <= 16 * 1024),
    );
    report.line(
        "daemon RSS after 10,000 denials (peak so far)",
        format!(
            "{} ({})",
            mib(rss_denials.0 as f64),
            mib(rss_denials.1 as f64)
        ),
        if f.seen.0 + f.seen.1 < DENIALS {
            format!(
                "{} of 10,000 denials in the log ({} lines, {} summarised)",
                f.seen.0 + f.seen.1,
                f.seen.0,
                f.seen.1
            )
        } else {
            format!(
                "all 10,000 in the log: {} lines, {} summarised",
                f.seen.0, f.seen.1
            )
        },
        "≤ 16 MiB",
        Some(rss_denials.0 <= 16 * 1024),
    );
    report.line(
        "daemon RSS, 64 ranges / 1,000 allowed / 10,000 leases",
        mib(rss_large.0 as f64),
        "",
        "≤ 16 MiB",
        Some(rss_large.0 <= 16 * 1024),
    );
    report.line(
        "daemon CPU when idle, small / large",
        format!("{:.2} / {:.2} %", f.idle_pct[0], f.idle_pct[1]),
        "of one CPU",
        "",
        None,
    );
    report.line(
        "daemon CPU during the bind() rounds, small / large",
        format!("{:.1} / {:.1} %", bind_pct[0], bind_pct[1]),
        "of one CPU (denial events included)",
        "",
        None,
    );
    report.record(
        "agent",
        json!({
            "load_attach_ns": { "small": ls, "large": ll }, "exec_to_enforcing_ns": { "small": ws, "large": wl },
            "rss_kib_after_start": rss_start, "rss_kib_after_denials": rss_denials, "rss_kib_large_with_leases": rss_large,
            "denials_logged": f.seen.0, "denials_summarised": f.seen.1, "idle_cpu_pct": f.idle_pct, "bind_phase_cpu_pct": bind_pct,
        }),
    );
}
