//! Phase 7, a flood of refused binds: one process in a refused cgroup binds a reserved port as fast
//! as it can, and a daemon of its own reads every denial event. Measures the daemon's CPU over the
//! flood (utime + stime, % of one CPU), and whether one refused bind from a second process, in a
//! second refused cgroup and with a command name of its own, made during the flood, still reaches
//! the daemon's log: a flood must neither cost the daemon a CPU nor hide another offender.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use serde_json::json;

use super::{denials_seen, reserve, Params, REFUSED, SMALL_RANGE};
use crate::{
    bind::errno_name,
    env::{self, Cg, Daemon, Pins, TempDir, Tree, Worker},
    report::Report,
};

/// The second offender's command name, which its denial line should carry.
const SECOND_COMM: &str = "pg-second";
/// How long after its bind the second offender's line may take to appear.
const LOG_WAIT: Duration = Duration::from_secs(5);
const CPU_TARGET_PCT: f64 = 5.0;

/// What phase 7 measured.
pub(super) struct Flooded {
    /// The flood's length as asked for, and as the flooding process measured it.
    asked: Duration,
    flood_ns: u64,
    binds: u64,
    /// The daemon's CPU over the wall time from the request to the answer, % of one CPU:
    /// utime + stime of /proc/PID/stat (the row) and the threads' schedstat (cross-check).
    wall: Duration,
    cpu_pct: f64,
    cpu_pct_schedstat: f64,
    /// The first line naming the second offender (its command name or its cgroup), if any.
    second_line: Option<String>,
    /// From the daemon's log lines since the flood began, read once the second offender's line was
    /// found (or [`LOG_WAIT`] after its bind): denial lines, the denials those lines and any summary
    /// so far account for, and events said to be lost. Informational (JSON only): a summary that
    /// comes later is not counted.
    lines_logged: u64,
    denials_seen: u64,
    events_lost: u64,
}

pub(super) fn measure(
    p: &Params,
    pg: &Path,
    pins: &Pins,
    tree: &Tree,
    tmp: &TempDir,
    daemons: &Cg,
) -> Result<Flooded> {
    eprintln!(
        "bench: the daemon under {} s of refused binds",
        p.flood.as_secs_f64()
    );
    let attach = tree.mkdir("flood")?;
    let allow = tree.mkdir("flood/allow")?;
    let offender = tree.mkdir("flood/offender")?;
    let second = tree.mkdir("flood/second")?;
    // Its own spawn parent: the default (/port-guard) would be made on the host, and left there.
    tree.mkdir("flood/spawn")?;
    let config = tmp.0.join("flood.toml");
    fs::write(
        &config,
        format!(
            "attach = \"{a}\"\nmode = \"enforce\"\nerrno = \"eaddrinuse\"\nprotect_ephemeral = false\n\
             spawn_parent = \"{a}/spawn\"\n{}",
            reserve(SMALL_RANGE, &[&allow.rel]),
            a = attach.rel
        ),
    )?;
    let d = Daemon::start(pg, &pins.dir("flood"), &config, daemons)?;
    let mut flood_w = Worker::spawn("flood", &offender)?;
    let mut second_w = Worker::spawn("second offender", &second)?;
    let r = second_w.call(&json!({ "op": "comm", "name": SECOND_COMM }))?;
    if r["comm"].as_str() != Some(SECOND_COMM) {
        bail!("the second offender's command name is {}", r["comm"]);
    }
    env::sleep(p.settle)?;

    let req = json!({ "op": "flood", "port": REFUSED, "ms": p.flood.as_millis() as u64 });
    let from = d.log_len();
    let (stat0, sched0) = (d.cpu_stat()?, d.cpu_time());
    let t0 = Instant::now();
    flood_w.send(&req)?;
    env::sleep(p.flood / 2)?;
    let second_r = second_w.call(&json!({ "op": "deny", "port": REFUSED, "n": 1 }))?;
    let second_at = Instant::now();
    let r = flood_w.recv(&req)?;
    let wall = t0.elapsed();
    let (stat1, sched1) = (d.cpu_stat()?, d.cpu_time());

    let (errno, other) = (
        r["errno"].as_i64().unwrap_or(-1) as i32,
        r["other"].as_u64().unwrap_or(0),
    );
    if errno != libc::EADDRINUSE || other != 0 {
        bail!(
            "the flood's bind() returned {} ({other} differed, first {}), expected EADDRINUSE",
            errno_name(errno),
            errno_name(r["other_errno"].as_i64().unwrap_or(0) as i32)
        );
    }
    if second_r["refused"].as_u64() != Some(1) {
        bail!("the second offender's bind of a reserved port was not refused");
    }
    let names_second = |l: &String| l.contains(SECOND_COMM) || l.contains(&second.rel);
    let second_line = loop {
        if let Some(l) = d.log_since(from).into_iter().find(names_second) {
            break Some(l);
        }
        if second_at.elapsed() > LOG_WAIT {
            break None;
        }
        env::sleep(Duration::from_millis(20))?;
    };
    let lines = d.log_since(from);
    let pct = |a: Duration, b: Duration| 100.0 * (b - a).as_secs_f64() / wall.as_secs_f64();
    Ok(Flooded {
        asked: p.flood,
        flood_ns: r["ns"].as_u64().unwrap_or(0),
        binds: r["n"].as_u64().unwrap_or(0),
        wall,
        cpu_pct: pct(stat0, stat1),
        cpu_pct_schedstat: pct(sched0, sched1),
        second_line,
        lines_logged: lines.iter().filter(|l| l.contains("denied bind")).count() as u64,
        denials_seen: {
            let (own, summarised) = denials_seen(&lines.join("\n"));
            own + summarised
        },
        events_lost: lines
            .iter()
            .filter_map(|l| number_before(l, " denial events were lost"))
            .sum(),
    })
}

/// The number just before `phrase` in `line`.
fn number_before(line: &str, phrase: &str) -> Option<u64> {
    let i = line.find(phrase)?;
    line[..i].rsplit(' ').next()?.parse().ok()
}

/// Two rows at the end of the "agent" section.
pub(super) fn rows(report: &mut Report, f: &Flooded) {
    let logged = f.second_line.is_some();
    let rate = f.binds as f64 / (f.flood_ns as f64 / 1e9);
    report.line(
        format!(
            "daemon CPU during {} s of refused binds from one process ({rate:.0} binds/s)",
            f.asked.as_secs_f64()
        ),
        format!("{:.1} %", f.cpu_pct),
        "of one CPU (utime + stime)",
        format!("≤ {CPU_TARGET_PCT:.0} %"),
        Some(f.cpu_pct <= CPU_TARGET_PCT),
    );
    report.line(
        "a second offender's single denial during the flood",
        if logged { "logged" } else { "NOT logged" },
        if logged {
            format!("within {} s", LOG_WAIT.as_secs())
        } else {
            format!(
                "no line naming comm={SECOND_COMM} or its cgroup within {} s",
                LOG_WAIT.as_secs()
            )
        },
        "must be logged",
        Some(logged),
    );
    report.record(
        "agent_flood",
        json!({
            "seconds_asked": f.asked.as_secs_f64(), "flood_ns": f.flood_ns, "binds": f.binds,
            "binds_per_s": rate, "wall_ns": f.wall.as_nanos() as u64,
            "daemon_cpu_pct": f.cpu_pct, "daemon_cpu_pct_schedstat": f.cpu_pct_schedstat,
            "second_offender_logged": logged, "second_offender_comm": SECOND_COMM,
            "second_offender_line": f.second_line,
            "log_wait_s": LOG_WAIT.as_secs(), "denial_lines_logged": f.lines_logged,
            "denials_seen_in_log": f.denials_seen, "events_lost_in_log": f.events_lost,
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counts_from_log_lines() {
        let l = "[2025 WARN port_guard::commands::daemon] 1234 denial events were lost (the event ring buffer was full)";
        assert_eq!(number_before(l, " denial events were lost"), Some(1234));
        assert_eq!(
            number_before("x denial events were lost", " denial events were lost"),
            None
        );
        assert_eq!(number_before("nothing", " denial events were lost"), None);
    }
}
