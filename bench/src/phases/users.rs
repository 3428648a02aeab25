//! Phase 8, a user with many cgroups: on a systemd host every login session owns a delegated
//! cgroup subtree, where it may make as many cgroups as it likes. A user (uid [`UID`]) with
//! [`IDLE`] idle cgroups makes [`PER_SECOND`] new ones a second, moves into each and makes one
//! refused bind from it; the daemon's CPU meanwhile (utime + stime), once with the capability
//! bounding set of the shipped unit (contrib/port-guard.service: CAP_DAC_READ_SEARCH, so cgroups
//! are reached by file handle) and once without CAP_DAC_READ_SEARCH (the daemon walks the cgroup
//! tree instead, in the background, at most once a second). Each run has a subtree of its own,
//! removed before the next, so both see the same number of cgroups.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::{reserve, Params, REFUSED, SMALL_RANGE};
use crate::{
    bind::errno_name,
    env::{self, Daemon, Pins, TempDir, Tree, Worker},
    report::Report,
};

/// The user: nobody, as in the tests.
const UID: u32 = 65534;
const IDLE: u64 = 3000;
const PER_SECOND: u64 = 150;
const CPU_TARGET_PCT: f64 = 5.0;
/// The shipped unit, whose capability bounding set the daemon runs under here.
const UNIT: &str = include_str!("../../../contrib/port-guard.service");
/// What the daemon logs at start when it cannot reach cgroups by file handle.
const NO_HANDLES: &str = "cannot be reached by file handle";

/// One run of the phase.
pub(super) struct Run {
    what: &'static str,
    /// The capabilities the daemon's bounding set had.
    caps: String,
    /// Whether the daemon reached cgroups by file handle (it says at start when it cannot).
    handles: bool,
    wall: Duration,
    made: u64,
    refused: u64,
    /// Seconds in which making and binding from 150 cgroups took the user longer than a second.
    behind: u64,
    cpu_pct: f64,
    cpu_pct_schedstat: f64,
    /// Denial lines naming the user, and "more denials by uid=..." summaries, in the run's log.
    lines: u64,
    summaries: u64,
}

pub(super) fn measure(
    p: &Params,
    pg: &Path,
    pins: &Pins,
    tree: &Tree,
    tmp: &TempDir,
    daemons: &env::Cg,
) -> Result<Vec<Run>> {
    let runs = [
        (
            "as the shipped unit runs it (CAP_DAC_READ_SEARCH: cgroups reached by file handle)",
            "cgcpu-unit",
            &[][..],
            true,
        ),
        (
            "without CAP_DAC_READ_SEARCH (the daemon walks the cgroup tree, at most once a second)",
            "cgcpu-walk",
            &["CAP_DAC_READ_SEARCH"][..],
            false,
        ),
    ];
    let mut out = Vec::new();
    for (what, name, without, handles) in runs {
        env::check_interrupted()?;
        let caps = unit_caps_without(without)?;
        eprintln!(
            "bench: the daemon {}, while uid {UID} makes {PER_SECOND} cgroups a second for {} s",
            if handles {
                "with the unit's capabilities"
            } else {
                "without CAP_DAC_READ_SEARCH"
            },
            p.users.as_secs_f64()
        );
        let attach = tree.mkdir(name)?;
        let run = one(
            p, pg, pins, tree, tmp, daemons, &attach, name, what, caps, handles,
        );
        // The run's thousands of cgroups go before the next run (and on failure too).
        let removed = tree.remove(&attach);
        let run = run?;
        removed?;
        out.push(run);
    }
    Ok(out)
}

/// The unit's capability bounding set without `drop`, as setpriv takes it ("-all,+bpf,...").
fn unit_caps_without(drop: &[&str]) -> Result<String> {
    let line = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("contrib/port-guard.service has no CapabilityBoundingSet= line")?;
    let caps: Vec<String> = line
        .split_whitespace()
        .filter(|c| !drop.contains(c))
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    Ok(format!("-all,{}", caps.join(",")))
}

#[expect(
    clippy::too_many_arguments,
    reason = "the phase's shared state, passed down as the other phases take it"
)]
fn one(
    p: &Params,
    pg: &Path,
    pins: &Pins,
    tree: &Tree,
    tmp: &TempDir,
    daemons: &env::Cg,
    attach: &env::Cg,
    name: &str,
    what: &'static str,
    caps: String,
    handles: bool,
) -> Result<Run> {
    let allow = tree.mkdir(&format!("{name}/allow"))?;
    tree.mkdir(&format!("{name}/spawn"))?;
    let user = tree.mkdir(&format!("{name}/user-{UID}"))?;
    env::delegate(&user, UID)?;
    let config = tmp.0.join(format!("{name}.toml"));
    fs::write(
        &config,
        format!(
            "attach = \"{a}\"\nmode = \"enforce\"\nerrno = \"eaddrinuse\"\nprotect_ephemeral = false\n\
             spawn_parent = \"{a}/spawn\"\n{}",
            reserve(SMALL_RANGE, &[&allow.rel]),
            a = attach.rel
        ),
    )?;
    // The user's session: put into its subtree as root, then the user; it makes its cgroups
    // itself, as a user manager does.
    let mut w = Worker::spawn(&format!("uid {UID}"), &user)?;
    let r = w.call(&json!({ "op": "setuid", "uid": UID }))?;
    if r["uid"].as_u64() != Some(u64::from(UID)) {
        bail!("the user's worker runs as uid {}", r["uid"]);
    }
    let dir = user.abs.to_str().context("cgroup path")?;
    w.call(&json!({ "op": "mkdirs", "dir": dir, "prefix": "idle", "n": IDLE }))?;

    let wrap = [
        "setpriv".to_owned(),
        format!("--bounding-set={caps}"),
        "--inh-caps=-all".to_owned(),
        "--".to_owned(),
    ];
    let d = Daemon::start_wrapped(pg, &pins.dir(name), &config, daemons, &[], &wrap)
        .context("starting the daemon under setpriv (util-linux)")?;
    env::sleep(p.users_settle)?;
    let reached_by_handle = !d.log().contains(NO_HANDLES);
    if reached_by_handle != handles {
        bail!(
            "the daemon {} cgroups by file handle under the bounding set {caps}, so the row would \
             measure another path than it says:\n{}",
            if reached_by_handle {
                "reaches"
            } else {
                "cannot reach"
            },
            d.log()
        );
    }

    let from = d.log_len();
    let secs = p.users.as_secs().max(1);
    let (stat0, sched0) = (d.cpu_stat()?, d.cpu_time());
    let t0 = Instant::now();
    let (mut made, mut refused, mut behind) = (0, 0, 0);
    for s in 0..secs {
        let req = json!({
            "op": "hop", "dir": format!("{dir}/b{s}"), "n": PER_SECOND, "port": REFUSED,
        });
        let r = w.call(&req)?;
        let (errno, other) = (
            r["errno"].as_i64().unwrap_or(-1) as i32,
            r["other"].as_u64().unwrap_or(0),
        );
        if errno != libc::EADDRINUSE || other != 0 {
            bail!(
                "a bind of uid {UID} from a new cgroup returned {} ({other} of {PER_SECOND} differed, first {}), expected EADDRINUSE",
                errno_name(errno),
                errno_name(r["other_errno"].as_i64().unwrap_or(0) as i32)
            );
        }
        made += PER_SECOND;
        refused += PER_SECOND;
        let next = t0 + Duration::from_secs(s + 1);
        match next.checked_duration_since(Instant::now()) {
            Some(wait) => env::sleep(wait)?,
            None => behind += 1,
        }
    }
    let wall = t0.elapsed();
    let (stat1, sched1) = (d.cpu_stat()?, d.cpu_time());
    let lines = d.log_since(from);
    let uid = format!("uid={UID}");
    drop(w);
    drop(d);
    let pct = |a: Duration, b: Duration| 100.0 * (b - a).as_secs_f64() / wall.as_secs_f64();
    Ok(Run {
        what,
        caps,
        handles,
        wall,
        made,
        refused,
        behind,
        cpu_pct: pct(stat0, stat1),
        cpu_pct_schedstat: pct(sched0, sched1),
        lines: lines
            .iter()
            .filter(|l| l.contains("denied bind") && l.contains(&uid))
            .count() as u64,
        summaries: lines
            .iter()
            .filter(|l| l.contains(&format!("more denials by {uid}")))
            .count() as u64,
    })
}

/// The section: one row per run.
pub(super) fn rows(report: &mut Report, p: &Params, runs: &[Run]) {
    report.section(format!(
        "a user with many cgroups: uid {UID} in a delegated subtree with {} idle cgroups makes {PER_SECOND} new ones a \
         second for {} s, and binds a reserved port once from each (refused); the daemon's CPU meanwhile",
        thousands(IDLE),
        p.users.as_secs()
    ));
    for r in runs {
        let rate = r.made as f64 / r.wall.as_secs_f64();
        report.line(
            format!(
                "daemon CPU, {} idle + {PER_SECOND} new cgroups/s of one user, each refused once: {}",
                thousands(IDLE),
                r.what
            ),
            format!("{:.1} %", r.cpu_pct),
            format!(
                "of one CPU (utime + stime) over {:.1} s; {} cgroups made ({rate:.0}/s), {} binds refused{}",
                r.wall.as_secs_f64(),
                thousands(r.made),
                thousands(r.refused),
                if r.behind > 0 {
                    format!("; the user fell behind in {} of the seconds", r.behind)
                } else {
                    String::new()
                }
            ),
            format!("≤ {CPU_TARGET_PCT:.0} % of a core"),
            Some(r.cpu_pct <= CPU_TARGET_PCT),
        );
    }
    report.record(
        "agent_user_cgroups",
        runs.iter()
            .map(|r| {
                json!({
                    "what": r.what, "bounding_set": r.caps, "cgroups_by_handle": r.handles,
                    "idle_cgroups": IDLE, "new_per_second": PER_SECOND,
                    "wall_ns": r.wall.as_nanos() as u64, "cgroups_made": r.made,
                    "binds_refused": r.refused, "seconds_behind": r.behind,
                    "daemon_cpu_pct": r.cpu_pct, "daemon_cpu_pct_schedstat": r.cpu_pct_schedstat,
                    "denial_lines_of_the_user": r.lines, "summaries_of_the_user": r.summaries,
                })
            })
            .collect::<Vec<_>>(),
    );
}

/// 3000 → "3,000".
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_units_bounding_set_in_setpriv_terms() {
        let all = unit_caps_without(&[]).unwrap();
        assert!(all.starts_with("-all,+"), "{all}");
        assert!(all.contains("+dac_read_search"), "{all}");
        let walk = unit_caps_without(&["CAP_DAC_READ_SEARCH"]).unwrap();
        assert!(!walk.contains("dac_read_search"), "{walk}");
        assert!(
            walk.contains("+bpf") && walk.contains("+net_admin"),
            "{walk}"
        );
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(3000), "3,000");
        assert_eq!(thousands(150), "150");
        assert_eq!(thousands(4500), "4,500");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
