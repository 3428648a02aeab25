//! Scale: the large configuration (64 ranges, 1,000 allowed cgroups, 10,000 leases), measured in
//! the same bind() rounds as the small one (1 range, 1 allowed cgroup, no lease), and its rows.

use std::fs;

use anyhow::Result;
use serde_json::json;

use super::{
    bind::{index, key, Measured, GUARDED, SCALE_AA},
    reserve, Layout, LEASES, LEASES_FIRST, SMALL_RANGE,
};
use crate::{
    bind::Kind,
    env::Cg,
    report::{ratio, time_ns, Report},
    stats::{paired_ratios, summarize},
};

/// The large configuration: the small range allowing `large/allow` and the 999 `many`, a range
/// for the 10,000 leases, and 62 ranges of 100 ports allowing 16 of the `many` each.
pub(super) fn write_large_config(large: &Layout, many: &[Cg]) -> Result<()> {
    let mut text = large.header();
    let mut range0: Vec<&str> = vec![&large.allow.rel];
    range0.extend(many.iter().map(|c| c.rel.as_str()));
    text += &reserve(SMALL_RANGE, &range0);
    text += &reserve(
        &format!("{LEASES_FIRST}-{}", u32::from(LEASES_FIRST) + LEASES - 1),
        &[],
    );
    for k in 0..62usize {
        let first = 50000 + 100 * k;
        let allow: Vec<&str> = (0..16)
            .map(|j| many[(k * 16 + j) % many.len()].rel.as_str())
            .collect();
        text += &reserve(&format!("{first}-{}", first + 99), &allow);
    }
    fs::write(&large.config, text)?;
    Ok(())
}

/// The "scale" section: each guarded scenario under the large guard against the small one, with
/// the A/A row (two workers under the small guard) for the noise.
pub(super) fn rows(report: &mut Report, m: &Measured) {
    let scenarios = &m.scenarios;
    report.section("scale: 64 ranges, 1,000 allowed cgroups, 10,000 leases vs 1 range, 1 allowed cgroup, 0 leases (ratio per round)");
    for kind in [Kind::Hook, Kind::Cycle] {
        let s = m.samples.of(kind);
        let what = if kind == Kind::Hook {
            "hook only"
        } else {
            "socket()+bind()+close()"
        };
        let (a, b) = (
            index(scenarios, SCALE_AA, Some(0)),
            index(scenarios, GUARDED[2], Some(0)),
        );
        let r = summarize(&paired_ratios(&s[a], &s[b]));
        report.line(
            format!("{what}: small, depth 8, a 2nd worker (A/A: the noise of this comparison)"),
            time_ns(summarize(&s[a]).median),
            format!("{} small", ratio(&r)),
            "",
            None,
        );
        report.record(&format!("scale.{}.aa", kind.op()), r);
        for label in GUARDED {
            let (si, li) = (
                index(scenarios, label, Some(0)),
                index(scenarios, label, Some(1)),
            );
            let r = summarize(&paired_ratios(&s[li], &s[si]));
            report.line(
                format!("{what}: {label}"),
                time_ns(summarize(&s[li]).median),
                format!("{} small", ratio(&r)),
                "≤ 1.02× small",
                Some(r.median <= 1.02),
            );
            report.record(
                &format!("scale.{}.{}", kind.op(), key(&scenarios[si])),
                json!({ "ns": summarize(&s[li]), "ratio_to_small": r }),
            );
        }
    }
}
