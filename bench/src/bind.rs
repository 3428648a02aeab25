//! bind() cost: every scenario has a worker parked in its cgroup; a round runs one batch of each
//! (scenario, kind) in a shuffled order, so that all scenarios share the machine's state of the
//! moment, and a ratio is taken per round against the baseline of the same round.

use anyhow::{bail, Result};
use serde_json::json;

use crate::{
    bpfstats::Prog,
    env::{check_interrupted, Worker},
    stats::{summarize, Rng, Summary},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// bind() on an already-bound socket: the hook runs, then __inet_bind fails with EINVAL.
    Hook,
    /// socket() + bind() + close().
    Cycle,
}

impl Kind {
    pub fn op(self) -> &'static str {
        match self {
            Kind::Hook => "hook",
            Kind::Cycle => "cycle",
        }
    }
}

/// One way of calling bind().
#[derive(Clone, Debug)]
pub struct Scenario {
    pub label: &'static str,
    /// None: no guard above the caller; Some(0) the small configuration, Some(1) the large one.
    pub guard: Option<usize>,
    pub worker: usize,
    pub port: u16,
    /// What bind() must return in a `Hook` batch and in a `Cycle` batch (0: success).
    pub hook_errno: i32,
    pub cycle_errno: i32,
}

/// ns per bind, per scenario, per round.
pub struct Samples {
    pub hook: Vec<Vec<f64>>,
    pub cycle: Vec<Vec<f64>>,
}

impl Samples {
    pub fn of(&self, kind: Kind) -> &Vec<Vec<f64>> {
        match kind {
            Kind::Hook => &self.hook,
            Kind::Cycle => &self.cycle,
        }
    }
}

/// Runs `n` binds of one kind; returns ns per bind. Fails when bind() did not return what the
/// scenario expects: a scenario that measures another code path than its label is worse than none.
pub fn batch(w: &mut Worker, kind: Kind, port: u16, n: u64, expect: i32) -> Result<f64> {
    let r = w.call(&json!({ "op": kind.op(), "port": port, "n": n }))?;
    let errno = r["errno"].as_i64().unwrap_or(-1) as i32;
    let other = r["other"].as_u64().unwrap_or(0);
    if errno != expect || other != 0 {
        let other_errno = r["other_errno"]
            .as_i64()
            .map(|e| format!(", first {}", errno_name(e as i32)))
            .unwrap_or_default();
        bail!(
            "{} ({} on port {port}): bind() returned {} ({other} of {n} differed{other_errno}), expected {}",
            w.label,
            kind.op(),
            errno_name(errno),
            errno_name(expect)
        );
    }
    Ok(r["ns"].as_f64().unwrap_or(f64::NAN) / n as f64)
}

pub fn errno_name(e: i32) -> String {
    match e {
        0 => "success".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EADDRINUSE => "EADDRINUSE".into(),
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        e => format!("errno {e}"),
    }
}

/// Batch sizes such that one batch of the baseline takes about `target_ns`.
pub fn calibrate(w: &mut Worker, port: u16, target_ns: f64) -> Result<(u64, u64)> {
    let mut sizes = [0u64; 2];
    for (i, (kind, expect)) in [(Kind::Hook, libc::EINVAL), (Kind::Cycle, 0)]
        .into_iter()
        .enumerate()
    {
        batch(w, kind, port, 1000, expect)?; // warm-up
        let per = (0..3)
            .map(|_| batch(w, kind, port, 1000, expect))
            .collect::<Result<Vec<_>>>()?;
        let per = summarize(&per).median;
        sizes[i] = ((target_ns / per) as u64).clamp(100, 1_000_000);
    }
    Ok((sizes[0], sizes[1]))
}

/// `rounds` interleaved rounds over every scenario and both kinds.
pub fn measure(
    workers: &mut [Worker],
    scenarios: &[Scenario],
    sizes: (u64, u64),
    rounds: usize,
    rng: &mut Rng,
) -> Result<Samples> {
    let mut samples = Samples {
        hook: vec![Vec::with_capacity(rounds); scenarios.len()],
        cycle: vec![Vec::with_capacity(rounds); scenarios.len()],
    };
    let mut order: Vec<(usize, Kind)> = (0..scenarios.len())
        .flat_map(|s| [(s, Kind::Hook), (s, Kind::Cycle)])
        .collect();
    // One unrecorded round: first-touch effects (page faults, cold caches, the first denial
    // events) stay out of the samples, and every scenario is checked before anything is kept.
    for round in 0..=rounds {
        check_interrupted()?;
        rng.shuffle(&mut order);
        for &(s, kind) in &order {
            let sc = &scenarios[s];
            let (n, expect) = match kind {
                Kind::Hook => (sizes.0, sc.hook_errno),
                Kind::Cycle => (sizes.1, sc.cycle_errno),
            };
            let ns = batch(&mut workers[sc.worker], kind, sc.port, n, expect)?;
            if round > 0 {
                match kind {
                    Kind::Hook => samples.hook[s].push(ns),
                    Kind::Cycle => samples.cycle[s].push(ns),
                }
            }
        }
    }
    Ok(samples)
}

/// The programs' own run time per bind (bpf_stats), per guarded scenario: `progs[g]` is the bind4
/// program of guard `g`. Statistics are on only inside this function.
pub fn program_time(
    workers: &mut [Worker],
    scenarios: &[Scenario],
    progs: &[Prog],
    n: u64,
    rounds: usize,
    rng: &mut Rng,
) -> Result<(Vec<Summary>, String)> {
    let on = crate::bpfstats::StatsOn::enable()?;
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    let mut order: Vec<usize> = (0..scenarios.len())
        .filter(|&s| scenarios[s].guard.is_some())
        .collect();
    for _ in 0..rounds {
        check_interrupted()?;
        rng.shuffle(&mut order);
        for &s in &order {
            let sc = &scenarios[s];
            let prog = &progs[sc.guard.expect("filtered")];
            let (t0, c0) = prog.stats()?;
            batch(
                &mut workers[sc.worker],
                Kind::Hook,
                sc.port,
                n,
                sc.hook_errno,
            )?;
            let (t1, c1) = prog.stats()?;
            if c1 - c0 < n {
                bail!(
                    "program {} ran {} times for {n} binds of {}: are statistics on?",
                    prog.id,
                    c1 - c0,
                    sc.label
                );
            }
            per[s].push((t1 - t0) as f64 / (c1 - c0) as f64);
        }
    }
    let before = on.sysctl_before().to_owned();
    drop(on);
    Ok((per.iter().map(|v| summarize(v)).collect(), before))
}

/// Which programs to read around a scenario's socket()+bind()+close() batches: its bind4 program
/// and its sock_release program.
pub struct CycleProbe<'a> {
    pub scenario: usize,
    pub bind: &'a Prog,
    pub release: &'a Prog,
}

/// The programs' own run time per socket()+bind()+close() (bpf_stats), per probe: (ns per run of
/// the bind4 program, ns per run of the sock_release program). A bind on a fresh socket is the
/// one a per-child share charges, and its close the one that uncharges it. Statistics are on only
/// inside this function.
pub fn cycle_program_time(
    workers: &mut [Worker],
    scenarios: &[Scenario],
    probes: &[CycleProbe<'_>],
    n: u64,
    rounds: usize,
    rng: &mut Rng,
) -> Result<Vec<(Summary, Summary)>> {
    let _on = crate::bpfstats::StatsOn::enable()?;
    let mut bind_ns: Vec<Vec<f64>> = vec![Vec::new(); probes.len()];
    let mut release_ns: Vec<Vec<f64>> = vec![Vec::new(); probes.len()];
    let mut order: Vec<usize> = (0..probes.len()).collect();
    for _ in 0..rounds {
        check_interrupted()?;
        rng.shuffle(&mut order);
        for &i in &order {
            let pr = &probes[i];
            let sc = &scenarios[pr.scenario];
            let (b0, r0) = (pr.bind.stats()?, pr.release.stats()?);
            batch(
                &mut workers[sc.worker],
                Kind::Cycle,
                sc.port,
                n,
                sc.cycle_errno,
            )?;
            let (b1, r1) = (pr.bind.stats()?, pr.release.stats()?);
            for (what, prog, (t0, c0), (t1, c1), out) in [
                ("bind4", pr.bind, b0, b1, &mut bind_ns[i]),
                ("sock_release", pr.release, r0, r1, &mut release_ns[i]),
            ] {
                if c1 - c0 < n {
                    bail!(
                        "{what} program {} ran {} times for {n} socket()+bind()+close() of {}: are statistics on?",
                        prog.id,
                        c1 - c0,
                        sc.label
                    );
                }
                out.push((t1 - t0) as f64 / (c1 - c0) as f64);
            }
        }
    }
    Ok(bind_ns
        .iter()
        .zip(&release_ns)
        .map(|(b, r)| (summarize(b), summarize(r)))
        .collect())
}

/// Baseline batches only (for the phases before and after any guard is loaded).
pub fn baseline_only(
    w: &mut Worker,
    port: u16,
    sizes: (u64, u64),
    rounds: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut hook, mut cycle) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        check_interrupted()?;
        hook.push(batch(w, Kind::Hook, port, sizes.0, libc::EINVAL)?);
        cycle.push(batch(w, Kind::Cycle, port, sizes.1, 0)?);
    }
    Ok((hook, cycle))
}
