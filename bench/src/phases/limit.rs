//! The per-child limit: the small configuration with `per_child_limit = LIMIT` on its range
//! ("limited"), measured in the same bind() rounds as the small one without a limit and the floor
//! program, and its rows.
//!
//! What the limit adds, and where it shows:
//! - an allowed bind of a reserved port on a fresh socket is charged to its unit (an atomic add and
//!   a read-back in PG_SHARES, the socket's cookie into PG_CHARGES), and its close uncharges it
//!   (the sock_release program): both in socket()+bind()+close();
//! - a bind on a socket that is bound already (the "hook only" batches) charges nothing: the
//!   program reads the limit and sees the socket bound;
//! - outside every range the bind program does nothing new, but with a limit configured every
//!   close of a TCP or UDP socket in the attach cgroup costs the release program a socket cookie and
//!   a hash lookup (it cannot read the socket's port): socket()+bind()+close() of a port outside
//!   every range shows it.

use serde_json::json;

use super::{
    bind::{index, key, Measured, FLOOR, GUARDED, LIMITED},
    Params, LIMIT,
};
use crate::{
    bind::Kind,
    report::{ratio, time_ns, Report},
    stats::{paired_ratios, summarize},
};

/// The scenarios the limited guard runs (the first three of [`GUARDED`]).
const LABELS: [&str; 3] = [GUARDED[0], GUARDED[1], GUARDED[2]];
/// Outside every range the limit must cost nothing over the floor, within the method's noise.
const OUTSIDE_TARGET: f64 = 1.02;

/// The "per-child limit" section: each scenario of the limited guard against the same scenario of
/// the small guard (no limit) and against the floor program, ratios per round.
pub(super) fn rows(report: &mut Report, m: &Measured) {
    let scenarios = &m.scenarios;
    report.section(format!(
        "per-child limit: the small configuration with per_child_limit = {LIMIT} (every bind of the range charged, \
         every close uncharged, none refused) vs the same without a limit, and vs the floor (ratio per round, [95% CI]; \
         hook only binds a bound socket, which is never charged)"
    ));
    let floor = index(scenarios, FLOOR, Some(2));
    for kind in [Kind::Hook, Kind::Cycle] {
        let s = m.samples.of(kind);
        let what = match kind {
            Kind::Hook => "hook only",
            Kind::Cycle => "socket()+bind()+close()",
        };
        for label in LABELS {
            let (li, si) = (
                index(scenarios, label, LIMITED),
                index(scenarios, label, Some(0)),
            );
            let over_small = summarize(&paired_ratios(&s[li], &s[si]));
            let over_floor = summarize(&paired_ratios(&s[li], &s[floor]));
            report.line(
                format!("{what}: {label}, limit {LIMIT}"),
                time_ns(summarize(&s[li]).median),
                format!("{} no limit", ratio(&over_small)),
                "",
                None,
            );
            let target = (label == GUARDED[0]).then_some(OUTSIDE_TARGET);
            report.line(
                format!("{what}: {label}, limit {LIMIT}, over the floor"),
                "",
                format!("{} floor", ratio(&over_floor)),
                target
                    .map(|t| format!("≤ {t:.2}× floor"))
                    .unwrap_or_default(),
                target.map(|t| over_floor.median <= t),
            );
            report.record(
                &format!("limit.{}.{}", kind.op(), key(&scenarios[li])),
                json!({
                    "ns": summarize(&s[li]),
                    "ratio_to_no_limit": over_small,
                    "ratio_to_floor": over_floor,
                }),
            );
        }
    }
}

/// The programs' own run time with and without the limit: the bind4 program on a bound socket
/// (hook only) and on a fresh one, and the sock_release program per close.
pub(super) fn program_rows(report: &mut Report, p: &Params, m: &Measured) {
    let scenarios = &m.scenarios;
    report.section(format!(
        "time inside the programs with per_child_limit = {LIMIT} / without (bpf_stats run_time_ns / run_cnt, {} rounds)",
        p.stats_rounds
    ));
    let cycle = |label: &str, g: Option<usize>| {
        let i = index(scenarios, label, g);
        m.cycle_prog_ns
            .iter()
            .find(|(s, _, _)| *s == i)
            .map(|(_, b, r)| (*b, *r))
            .unwrap_or_else(|| panic!("no program times for {label:?} under {g:?}"))
    };
    let pair = |what: String, limited: f64, plain: f64| {
        (
            what,
            format!("{limited:.0} / {plain:.0} ns"),
            format!(
                "limit = {:.2}× no limit ({:+.0} ns)",
                limited / plain,
                limited - plain
            ),
        )
    };
    let mut lines = Vec::new();
    for label in LABELS {
        let (l, s) = (
            m.prog_ns[index(scenarios, label, LIMITED)].median,
            m.prog_ns[index(scenarios, label, Some(0))].median,
        );
        lines.push(pair(
            format!("bind4, hook only (a bound socket: not charged): {label}"),
            l,
            s,
        ));
    }
    for label in LABELS {
        let (l, s) = (cycle(label, LIMITED).0, cycle(label, Some(0)).0);
        let what = if label == GUARDED[0] {
            format!("bind4, socket()+bind()+close(): {label}")
        } else {
            format!("bind4, socket()+bind()+close(): {label} (the charge)")
        };
        lines.push(pair(what, l.median, s.median));
    }
    for label in LABELS {
        let (l, s) = (cycle(label, LIMITED).1, cycle(label, Some(0)).1);
        let what = if label == GUARDED[0] {
            format!("sock_release, per close: {label} (cookie + lookup, nothing to uncharge)")
        } else {
            format!("sock_release, per close: {label} (the uncharge)")
        };
        lines.push(pair(what, l.median, s.median));
    }
    for (what, figure, ratio) in lines {
        report.line(what, figure, ratio, "", None);
    }
    let json: serde_json::Map<String, serde_json::Value> = LABELS
        .iter()
        .map(|label| {
            let li = index(scenarios, label, LIMITED);
            let si = index(scenarios, label, Some(0));
            let (lc, sc) = (cycle(label, LIMITED), cycle(label, Some(0)));
            (
                key(&scenarios[li]),
                json!({
                    "hook_bind4_ns": { "limit": m.prog_ns[li], "no_limit": m.prog_ns[si] },
                    "cycle_bind4_ns": { "limit": lc.0, "no_limit": sc.0 },
                    "cycle_release_ns": { "limit": lc.1, "no_limit": sc.1 },
                }),
            )
        })
        .collect();
    report.record("limit.program_ns", json);
}
