//! Phases 1, 3 and 4, bind(): the baseline with no bind program of the bench loaded (before any
//! guard exists, and again after they are gone), every scenario's bind() in interleaved rounds
//! with the daemons of phase 2 running, and the programs' own run time from bpf_stats: the bind4
//! programs' on a bound socket, and for the small and the limited guard the bind4 and the
//! sock_release programs' around socket()+bind()+close().

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use super::{agent::Daemons, Cgroups, Params, LEASED, OUTSIDE, REFUSED, RESERVED};
use crate::{
    bind::{self, CycleProbe, Kind, Samples, Scenario},
    bpfstats::{self, Prog},
    env::{self, Cg, Pins, Worker},
    report::{ratio, time_ns, Report},
    stats::{paired_ratios, summarize, Rng, Summary},
};

pub(super) const FLOOR: &str = "a bind4 program that only returns 1 (floor)";
/// A second depth-8 worker under the small guard: the noise between two workers that differ in
/// nothing, against which the scale ratios can be read.
pub(super) const SCALE_AA: &str = "reserved, allowed, depth 8, 2nd worker (A/A)";
/// A refusal of the small configuration made through the sentinel port (guard 3): the bind is
/// rewritten to the port the daemon's sentinel holds and the kernel answers EADDRINUSE.
pub(super) const SENTINEL: &str = "refused (EADDRINUSE through the sentinel port)";
/// The guard index of the limited configuration (the small one with a per-child limit); 0 is
/// the small, 1 the large, 2 the floor program, 3 the small through the sentinel.
pub(super) const LIMITED: Option<usize> = Some(4);
pub(super) const GUARDED: [&str; 5] = [
    "port outside every range",
    "reserved, allowed, depth 1",
    "reserved, allowed, depth 8",
    "leased to the caller",
    "refused (EADDRINUSE)",
];

/// The "no bind program of the bench loaded" batches, before and after, and the batch sizes every
/// phase uses.
pub(super) struct Baseline {
    pub sizes: (u64, u64),
    /// cgroup sock_addr programs of others seen during a baseline phase.
    pub foreign: usize,
    pub hook: Vec<f64>,
    pub cycle: Vec<f64>,
}

/// Phase 1: calibrates the batch sizes and takes the baseline with no guard of ours loaded. The
/// worker goes on as the "no guard" scenario of phase 3.
pub(super) fn baseline_before(p: &Params, free: &Cg) -> Result<(Baseline, Worker)> {
    eprintln!("bench: baseline, no guard loaded");
    let mut base_w = Worker::spawn("no guard", free)?;
    let sizes = bind::calibrate(&mut base_w, OUTSIDE, p.batch_ns)?;
    let foreign = foreign_sock_addr_programs();
    let (hook, cycle) = bind::baseline_only(&mut base_w, OUTSIDE, sizes, p.base_rounds)?;
    Ok((
        Baseline {
            sizes,
            foreign,
            hook,
            cycle,
        },
        base_w,
    ))
}

/// What phases 3 and 4 measured.
pub(super) struct Measured {
    pub scenarios: Vec<Scenario>,
    pub samples: Samples,
    /// ns inside the bind4 program, per scenario (NaN for unguarded ones).
    pub prog_ns: Vec<Summary>,
    /// Per socket()+bind()+close() of a scenario of the small and the limited guard: (scenario,
    /// ns per run of its bind4 program, ns per run of its sock_release program).
    pub cycle_prog_ns: Vec<(usize, Summary, Summary)>,
    sysctl_before: String,
    sysctl_after: String,
    /// The small and the large daemon's CPU during the rounds, % of one CPU.
    pub daemon_cpu_pct: Vec<f64>,
}

/// Phases 3 and 4: the interleaved bind() rounds and the programs' run time, then the guards are
/// unloaded and the baseline taken again (into `base`).
pub(super) fn measure(
    p: &Params,
    pins: &Pins,
    cg: &Cgroups,
    base: &mut Baseline,
    base_w: Worker,
    daemons: Daemons,
    rng: &mut Rng,
) -> Result<Measured> {
    let sizes = base.sizes;
    eprintln!(
        "bench: bind(), {} interleaved rounds of {} + {} binds per batch",
        p.rounds, sizes.0, sizes.1
    );
    let bpfstats::Floor {
        link: floor_link,
        prog: floor_prog,
    } = bpfstats::Floor::attach(&cg.floor.abs)?;
    let (mut workers, scenarios) = scenarios(cg, base_w)?;
    let Daemons {
        small: small_d,
        large: large_d,
        sentinel: sentinel_d,
        limited: limited_d,
    } = daemons;
    let bind_cpu0 = [small_d.cpu_time(), large_d.cpu_time()];
    let t_bind = Instant::now();
    let samples = bind::measure(&mut workers, &scenarios, sizes, p.rounds, rng)?;
    let bind_wall = t_bind.elapsed();
    let bind_cpu1 = [small_d.cpu_time(), large_d.cpu_time()];
    eprintln!(
        "bench: programs' own run time (bpf_stats), {} rounds",
        p.stats_rounds
    );
    let progs = [
        Prog::from_link_pin(&pins.dir("small").join("link_bind4"))?,
        Prog::from_link_pin(&pins.dir("large").join("link_bind4"))?,
        floor_prog,
        Prog::from_link_pin(&pins.dir("sentinel").join("link_bind4"))?,
        Prog::from_link_pin(&pins.dir("limited").join("link_bind4"))?,
    ];
    let (prog_ns, sysctl_before) = bind::program_time(
        &mut workers,
        &scenarios,
        &progs,
        sizes.0,
        p.stats_rounds,
        rng,
    )?;
    // The sock_release programs run at close: read them around socket()+bind()+close() batches
    // (the per-child share is charged by a bind of a fresh socket only).
    let release = [
        Prog::from_link_pin(&pins.dir("small").join("link_release"))?,
        Prog::from_link_pin(&pins.dir("limited").join("link_release"))?,
    ];
    let probes: Vec<CycleProbe<'_>> = [
        (Some(0), &progs[0], &release[0]),
        (LIMITED, &progs[4], &release[1]),
    ]
    .into_iter()
    .flat_map(|(g, bind, release)| {
        let scenarios = &scenarios;
        GUARDED[..3].iter().map(move |label| CycleProbe {
            scenario: index(scenarios, label, g),
            bind,
            release,
        })
    })
    .collect();
    let cycle_ns = bind::cycle_program_time(
        &mut workers,
        &scenarios,
        &probes,
        sizes.1,
        p.stats_rounds,
        rng,
    )?;
    let cycle_prog_ns = probes
        .iter()
        .zip(cycle_ns)
        .map(|(pr, (b, r))| (pr.scenario, b, r))
        .collect();
    drop(probes);
    let sysctl_after = bpfstats::read_sysctl();

    // 4. Baseline again, guards gone.
    let mut base_w = workers.swap_remove(0);
    drop(workers);
    drop(progs);
    drop(release);
    drop(limited_d);
    drop(small_d);
    drop(large_d);
    drop(sentinel_d);
    drop(floor_link);
    // Detached programs are freed after an RCU grace period: let them go before counting.
    env::sleep(Duration::from_millis(300))?;
    eprintln!("bench: baseline again, guards unloaded");
    base.foreign = base.foreign.max(foreign_sock_addr_programs());
    let (h, c) = bind::baseline_only(&mut base_w, OUTSIDE, sizes, p.base_rounds)?;
    base.hook.extend(h);
    base.cycle.extend(c);
    drop(base_w);

    let daemon_cpu_pct = (0..2)
        .map(|g| 100.0 * (bind_cpu1[g] - bind_cpu0[g]).as_secs_f64() / bind_wall.as_secs_f64())
        .collect();
    Ok(Measured {
        scenarios,
        samples,
        prog_ns,
        cycle_prog_ns,
        sysctl_before,
        sysctl_after,
        daemon_cpu_pct,
    })
}

/// The workers (the baseline's first) and the scenarios they run: no guard (twice), the floor
/// program, each guarded scenario under the small and the large guard, and the first three under
/// the limited one.
fn scenarios(cg: &Cgroups, base_w: Worker) -> Result<(Vec<Worker>, Vec<Scenario>)> {
    let mut workers = vec![
        base_w,
        Worker::spawn("no guard (A/A)", &cg.free2)?,
        Worker::spawn("floor", &cg.floor)?,
    ];
    let mut scenarios = vec![
        Scenario {
            label: "no guard",
            guard: None,
            worker: 0,
            port: OUTSIDE,
            hook_errno: libc::EINVAL,
            cycle_errno: 0,
        },
        Scenario {
            label: "no guard, 2nd worker (A/A)",
            guard: None,
            worker: 1,
            port: OUTSIDE,
            hook_errno: libc::EINVAL,
            cycle_errno: 0,
        },
        Scenario {
            label: FLOOR,
            guard: Some(2),
            worker: 2,
            port: OUTSIDE,
            hook_errno: libc::EINVAL,
            cycle_errno: 0,
        },
    ];
    // The refusal through the sentinel: on a bound socket ("hook only") the rewritten bind goes
    // on to the kernel's "already bound" check (EINVAL); a fresh socket meets the sentinel
    // (EADDRINUSE).
    workers.push(Worker::spawn("sentinel/out", &cg.sentinel.out)?);
    scenarios.push(Scenario {
        label: SENTINEL,
        guard: Some(3),
        worker: workers.len() - 1,
        port: REFUSED,
        hook_errno: libc::EINVAL,
        cycle_errno: libc::EADDRINUSE,
    });
    for (g, l) in [&cg.small, &cg.large].into_iter().enumerate() {
        let base = workers.len();
        for (label, cg) in [
            ("out", &l.out),
            ("d1", &l.d1),
            ("d8", &l.d8),
            ("lessee", &l.lessee),
        ] {
            workers.push(Worker::spawn(&format!("{}/{label}", l.name), cg)?);
        }
        if g == 0 {
            workers.push(Worker::spawn(&format!("{}/d8 (A/A)", l.name), &l.d8)?);
            scenarios.push(Scenario {
                label: SCALE_AA,
                guard: Some(0),
                worker: base + 4,
                port: RESERVED,
                hook_errno: libc::EINVAL,
                cycle_errno: 0,
            });
        }
        let e = libc::EINVAL;
        let r = libc::EADDRINUSE;
        scenarios.extend([
            Scenario {
                label: GUARDED[0],
                guard: Some(g),
                worker: base,
                port: OUTSIDE,
                hook_errno: e,
                cycle_errno: 0,
            },
            Scenario {
                label: GUARDED[1],
                guard: Some(g),
                worker: base + 1,
                port: RESERVED,
                hook_errno: e,
                cycle_errno: 0,
            },
            Scenario {
                label: GUARDED[2],
                guard: Some(g),
                worker: base + 2,
                port: RESERVED,
                hook_errno: e,
                cycle_errno: 0,
            },
            Scenario {
                label: GUARDED[3],
                guard: Some(g),
                worker: base + 3,
                port: LEASED,
                hook_errno: e,
                cycle_errno: 0,
            },
            Scenario {
                label: GUARDED[4],
                guard: Some(g),
                worker: base,
                port: REFUSED,
                hook_errno: r,
                cycle_errno: r,
            },
        ]);
    }
    // The limited configuration: outside the range, and allowed at depths 1 and 8 (every bind
    // on a fresh socket charged to its unit, d1 or c1; never refused: one socket at a time).
    let base = workers.len();
    for (label, c) in [
        ("out", &cg.limited.out),
        ("d1", &cg.limited.d1),
        ("d8", &cg.limited.d8),
    ] {
        workers.push(Worker::spawn(&format!("limited/{label}"), c)?);
    }
    for (i, (label, port)) in [
        (GUARDED[0], OUTSIDE),
        (GUARDED[1], RESERVED),
        (GUARDED[2], RESERVED),
    ]
    .into_iter()
    .enumerate()
    {
        scenarios.push(Scenario {
            label,
            guard: LIMITED,
            worker: base + i,
            port,
            hook_errno: libc::EINVAL,
            cycle_errno: 0,
        });
    }
    Ok((workers, scenarios))
}

/// The "bind() from a process in …" section: every scenario of the small guard against no guard
/// and against the floor, and the baseline with no bind program loaded.
pub(super) fn rows(report: &mut Report, p: &Params, m: &Measured, base: &Baseline) {
    let scenarios = &m.scenarios;
    report.section(format!("bind() from a process in … (tcp/IPv4, medians of {} interleaved rounds; ratio per round, [95% CI])", p.rounds));
    for kind in [Kind::Hook, Kind::Cycle] {
        let what = match kind {
            Kind::Hook => "hook only: bind() on a bound socket",
            Kind::Cycle => "socket()+bind()+close()",
        };
        let s = m.samples.of(kind);
        let no_guard = &s[0];
        let target = |label: &str| match (kind, label) {
            (_, l) if l == GUARDED[0] => Some(1.02),
            (_, l) if l == GUARDED[2] => Some(1.05),
            _ => None,
        };
        for (i, sc) in scenarios
            .iter()
            .enumerate()
            .filter(|(_, sc)| sc.guard != Some(1) && sc.guard != LIMITED && sc.label != SCALE_AA)
        {
            let r = summarize(&paired_ratios(&s[i], no_guard));
            let t = target(sc.label);
            report.line(
                format!("{what}: {}", sc.label),
                time_ns(summarize(&s[i]).median),
                if i == 0 {
                    "1 (baseline)".into()
                } else {
                    format!("{} no guard", ratio(&r))
                },
                t.map(|t| format!("≤ {t:.2}× no guard")).unwrap_or_default(),
                t.map(|t| r.median <= t),
            );
            report.record(
                &format!("bind.{}.{}", kind.op(), key(sc)),
                json!({ "ns": summarize(&s[i]), "ratio_to_no_guard": r }),
            );
        }
        // What the guard adds over the cost of running any bind program there.
        let floor = index(scenarios, FLOOR, Some(2));
        for (i, sc) in scenarios
            .iter()
            .enumerate()
            .filter(|(_, sc)| sc.guard == Some(0) && sc.label != SCALE_AA)
        {
            let r = summarize(&paired_ratios(&s[i], &s[floor]));
            report.line(
                format!("{what}: {}, over the floor", sc.label),
                "",
                format!("{} floor", ratio(&r)),
                "",
                None,
            );
            report.record(&format!("bind.{}.{}.ratio_to_floor", kind.op(), key(sc)), r);
        }
        // What refusing through the sentinel costs over refusing with bpf_set_retval.
        let (si, ri) = (
            index(scenarios, SENTINEL, Some(3)),
            index(scenarios, GUARDED[4], Some(0)),
        );
        let r = summarize(&paired_ratios(&s[si], &s[ri]));
        report.line(
            format!("{what}: refused through the sentinel port vs by bpf_set_retval"),
            "",
            format!("{} set_retval", ratio(&r)),
            "",
            None,
        );
        report.record(&format!("bind.{}.sentinel_vs_set_retval", kind.op()), r);
        let pre = match kind {
            Kind::Hook => &base.hook,
            Kind::Cycle => &base.cycle,
        };
        let pre_s = summarize(pre);
        report.line(
            format!(
                "{what}: no bind program of the bench loaded (before and after, not interleaved)"
            ),
            time_ns(pre_s.median),
            format!(
                "no guard = {:.3}× this",
                summarize(no_guard).median / pre_s.median
            ),
            "",
            None,
        );
        report.record(&format!("bind.{}.no_program_loaded", kind.op()), pre_s);
    }
}

/// The "time inside the bind4 program" section, and the notes on bpf_stats and on programs of
/// others.
pub(super) fn program_rows(report: &mut Report, p: &Params, m: &Measured, foreign: usize) {
    let (scenarios, prog_ns) = (&m.scenarios, &m.prog_ns);
    report.section(format!(
        "time inside the bind4 program (bpf_stats run_time_ns / run_cnt, {} rounds)",
        p.stats_rounds
    ));
    for label in GUARDED {
        let (si, li) = (
            index(scenarios, label, Some(0)),
            index(scenarios, label, Some(1)),
        );
        report.line(
            format!("{label}: small / large"),
            format!("{:.0} / {:.0} ns", prog_ns[si].median, prog_ns[li].median),
            format!(
                "large = {:.2}× small",
                prog_ns[li].median / prog_ns[si].median
            ),
            "",
            None,
        );
        report.record(
            &format!("program_ns.{}", key(&scenarios[si])),
            json!({ "small": prog_ns[si], "large": prog_ns[li] }),
        );
    }
    let (ti, ri) = (
        index(scenarios, SENTINEL, Some(3)),
        index(scenarios, GUARDED[4], Some(0)),
    );
    report.line(
        format!("{SENTINEL}: small"),
        format!("{:.0} ns", prog_ns[ti].median),
        format!(
            "{:.2}× a refusal by bpf_set_retval ({:.0} ns): the socket lookup",
            prog_ns[ti].median / prog_ns[ri].median,
            prog_ns[ri].median
        ),
        "",
        None,
    );
    report.record("program_ns.refused_through_the_sentinel", prog_ns[ti]);
    let fi = index(scenarios, FLOOR, Some(2));
    report.line(
        FLOOR,
        format!("{:.0} ns", prog_ns[fi].median),
        "bpf_stats' own overhead, mostly",
        "",
        None,
    );
    report.record("program_ns.floor", prog_ns[fi]);
    report.note(format!(
        "bpf_stats were on only while the program run times were read (BPF_ENABLE_STATS fd); kernel.bpf_stats_enabled was {} before and {} after",
        m.sysctl_before, m.sysctl_after
    ));
    if foreign > 0 {
        report.note(format!(
            "{foreign} cgroup sock_addr program(s) of others were loaded on the host during a baseline phase: while any bind4 \
             program is attached anywhere, every bind() on the host takes the kernel's cgroup-bpf path (lock_sock and the \
             effective-array walk), so the 'no bind program' rows may include that cost"
        ));
    }
}

/// The scenario with `label` under `guard` (None: no guard, Some(0) small, Some(1) large,
/// Some(2) the floor program, Some(3) the small configuration through the sentinel, [`LIMITED`]
/// the small configuration with a per-child limit).
pub(super) fn index(scenarios: &[Scenario], label: &str, guard: Option<usize>) -> usize {
    scenarios
        .iter()
        .position(|x| x.label == label && x.guard == guard)
        .unwrap_or_else(|| panic!("no scenario {label:?} under guard {guard:?}"))
}

pub(super) fn key(sc: &Scenario) -> String {
    sc.label
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("_")
        .to_lowercase()
}

/// cgroup sock_addr programs loaded on the host that are not the bench's (none of ours exists
/// when this runs).
fn foreign_sock_addr_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.program_type() == aya_obj::generated::bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR
        })
        .count()
}
