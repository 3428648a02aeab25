//! Phase 5, lease allocation: the library's `allocate()` (run in the lessee cgroup, as spawn runs
//! it) against libvirt's way (an in-process bitmap and a probe bind), at several fill levels of a
//! 20,000-port range.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use port_guard::{maps::Maps, pin::PinDir};
use serde_json::json;

use super::{claim, Params, ALLOC_FIRST, ALLOC_LAST};
use crate::{
    env::{check_interrupted, Cg, Worker},
    report::{time_ns, Report},
    stats::{summarize, Rng, Summary},
};

/// Lease allocation at several fill levels of the 20,000-port range: the library (`allocate`, run
/// in the lessee cgroup as spawn runs it) against libvirt's way (bitmap + probe bind), interleaved.
pub(super) fn allocation(
    report: &mut Report,
    p: &Params,
    pin: &Path,
    lessee: &Cg,
    free: &Cg,
    rng: &mut Rng,
) -> Result<()> {
    eprintln!(
        "bench: lease allocation at fill levels {:?}, {} allocations each",
        p.alloc_levels, p.alloc_m
    );
    let mut lib_w = Worker::spawn("allocator (library)", lessee)?;
    let mut bare_w = Worker::spawn("allocator (bare probe-bind)", free)?;
    let mut maps = Maps::open(&PinDir::new(pin))?;
    let methods: Vec<Option<&'static str>> = vec![None, Some("bare")];
    // per method, per level: every allocation's ns
    let mut ns: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); p.alloc_levels.len()]; methods.len()];
    for _ in 0..p.alloc_reps {
        let mut order: Vec<(usize, usize)> = (0..methods.len())
            .flat_map(|m| (0..p.alloc_levels.len()).map(move |l| (m, l)))
            .collect();
        rng.shuffle(&mut order);
        for (m, l) in order {
            check_interrupted()?;
            let level = p.alloc_levels[l];
            let r = match methods[m] {
                Some("bare") => bare_w.call(&json!({
                    "op": "alloc_bare", "first": ALLOC_FIRST, "last": ALLOC_LAST, "prefill": level, "m": p.alloc_m,
                }))?,
                _ => {
                    // The range is filled up to `level` with leases (claims only: the allocator
                    // skips them whoever holds them) on the lowest ports, the layout a
                    // lowest-first allocator makes, like the bare one's.
                    let filled: Vec<u16> = (ALLOC_FIRST..).take(level as usize).collect();
                    for &port in &filled {
                        claim(&mut maps, port, lessee)?;
                    }
                    let r = lib_w.call(&json!({
                        "op": "alloc_lib", "pin": pin, "cgroup_id": lessee.id, "level": lessee.level, "m": p.alloc_m,
                    }));
                    for &port in &filled {
                        let _ = maps.leases_mut().release(port);
                    }
                    let r = r?;
                    if r["first_port"].as_u64() != Some(u64::from(ALLOC_FIRST) + level) {
                        bail!("the library allocated {} first, expected {}", r["first_port"], u64::from(ALLOC_FIRST) + level);
                    }
                    r
                }
            };
            ns[m][l].extend(
                r["ns"]
                    .as_array()
                    .context("no ns")?
                    .iter()
                    .filter_map(|v| v.as_f64()),
            );
        }
    }
    let med: Vec<Vec<Summary>> = ns
        .iter()
        .map(|per| per.iter().map(|v| summarize(v)).collect())
        .collect();
    report.section(format!(
        "lease allocation, {}-{} ({} ports), {} allocations per fill level × {}: median per allocation (rate)",
        ALLOC_FIRST,
        ALLOC_LAST,
        u32::from(ALLOC_LAST - ALLOC_FIRST) + 1,
        p.alloc_m,
        p.alloc_reps
    ));
    let bare = 1;
    for (m, method) in methods.iter().enumerate().filter(|(m, _)| *m != bare) {
        let name = match method {
            None => "library allocate()".to_owned(),
            Some(c) => format!("candidate {c}"),
        };
        for (l, level) in p.alloc_levels.iter().enumerate() {
            let lib = med[m][l].median;
            let b = med[bare][l].median;
            let rate = 1e9 / lib;
            let r = lib / b;
            report.line(
                format!(
                    "{name}, range {:.0}% leased",
                    100.0 * *level as f64 / 20000.0
                ),
                format!("{} ({:.0}/s)", time_ns(lib), rate),
                format!("{r:.2}× bare probe-bind ({})", time_ns(b)),
                "≥ 20,000/s, ≤ 1.5× bare",
                Some(rate >= 20_000.0 && r <= 1.5),
            );
        }
        if let Some((rate, ratio)) = fill_rate(&p.alloc_levels, &med[m], &med[bare]) {
            report.line(
                format!("{name}: filling the whole range (from the levels above)"),
                format!("{rate:.0}/s"),
                format!("{ratio:.2}× bare probe-bind"),
                "≥ 20,000/s, ≤ 1.5× bare",
                Some(rate >= 20_000.0 && ratio <= 1.5),
            );
        }
    }
    report.record(
        "allocation",
        json!({
            "levels": p.alloc_levels,
            "methods": methods.iter().map(|m| m.unwrap_or("library")).collect::<Vec<_>>(),
            "ns_per_allocation": med,
        }),
    );
    Ok(())
}

/// Leases per second over a fill of the whole range, integrating the per-allocation medians over
/// the fill levels (trapezoids; the last level's cost up to the end), and the ratio to bare.
fn fill_rate(levels: &[u64], lib: &[Summary], bare: &[Summary]) -> Option<(f64, f64)> {
    if levels.len() < 3 || levels[0] != 0 {
        return None;
    }
    let total = |s: &[Summary]| {
        let mut t = 0.0;
        for i in 0..levels.len() {
            let next = levels.get(i + 1).copied().unwrap_or(20_000);
            let end = s.get(i + 1).map(|x| x.median).unwrap_or(s[i].median);
            t += (next - levels[i]) as f64 * (s[i].median + end) / 2.0;
        }
        t
    };
    let (tl, tb) = (total(lib), total(bare));
    Some((20_000.0 / (tl / 1e9), tl / tb))
}
