//! The end of a run: the kernel × test table, the reasons for every skip, failure and partial
//! pass, one summary line per kernel, and the slowest tests.

use super::qemu::{fmt_secs, Outcome, Status, TestResult};

pub(super) fn report(outcomes: &[Outcome]) {
    table(outcomes);
    reasons(outcomes);
    summaries(outcomes);
    slowest(outcomes);
}

fn tag(r: &TestResult) -> &'static str {
    match r.status {
        Status::Pass if r.note.is_empty() => "pass",
        Status::Pass => "pass*",
        Status::Skip => "skip",
        Status::Fail => "FAIL",
    }
}

/// A row per test (in the order they first ran), a column per kernel.
fn table(outcomes: &[Outcome]) {
    let mut ids: Vec<&str> = Vec::new();
    for o in outcomes {
        for r in &o.results {
            if !ids.contains(&r.id.as_str()) {
                ids.push(&r.id);
            }
        }
    }
    let width = ids.iter().map(|i| i.len()).max().unwrap_or(4).max(4);
    eprintln!("\nkernel × test (the reasons follow the table)\n");
    let mut head = format!("{:width$}", "test");
    for o in outcomes {
        head += &format!("  {:>6}", o.series.name);
    }
    eprintln!("{head}");
    for id in &ids {
        let mut row = format!("{id:width$}");
        for o in outcomes {
            let cell = o.results.iter().find(|r| r.id == *id).map_or("-", tag);
            row += &format!("  {cell:>6}");
        }
        eprintln!("{row}");
    }
}

/// The note of every skip, failure and partial pass.
fn reasons(outcomes: &[Outcome]) {
    let notes: Vec<String> = outcomes
        .iter()
        .flat_map(|o| {
            o.results
                .iter()
                .filter(|r| !r.note.is_empty())
                .map(move |r| format!("  {:5} {:5} {}: {}", o.series.name, tag(r), r.id, r.note))
        })
        .collect();
    if !notes.is_empty() {
        eprintln!("\nreasons (pass* = passed, a part skipped):");
        for n in notes {
            eprintln!("{n}");
        }
    }
}

/// A line per kernel: its package, boot and suite times, the counts, how it ended.
fn summaries(outcomes: &[Outcome]) {
    eprintln!("\nkernel  package                                      boot     suite    pass  skip  fail  end");
    for o in outcomes {
        let count = |s: Status| o.results.iter().filter(|r| r.status == s).count();
        eprintln!(
            "{:7} {:44} {:>8} {:>8} {:>5} {:>5} {:>5}  {}",
            o.series.name,
            format!("{} {}", o.package, o.version),
            fmt_secs(o.boot),
            fmt_secs(o.suite),
            count(Status::Pass),
            count(Status::Skip),
            count(Status::Fail),
            o.end.describe()
        );
    }
}

/// The five slowest tests of the run.
fn slowest(outcomes: &[Outcome]) {
    let mut all: Vec<(&str, &TestResult)> = outcomes
        .iter()
        .flat_map(|o| o.results.iter().map(move |r| (o.series.name, r)))
        .collect();
    all.sort_by_key(|(_, r)| std::cmp::Reverse(r.took.unwrap_or_default()));
    let slow: Vec<String> = all
        .iter()
        .take(5)
        .map(|(k, r)| format!("{k} {} {}", r.id, fmt_secs(r.took)))
        .collect();
    if !slow.is_empty() {
        eprintln!("\nslowest: {}", slow.join(", "));
    }
}
