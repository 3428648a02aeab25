//! The one table the bench prints: sections of rows, each a measurement, its median, the ratio or
//! figure it is judged by, the target and whether it is met. Text for the terminal, Markdown for
//! docs/benchmarks.md, JSON (every sample summary) for machines.

use std::fmt::Write as _;

use crate::stats::Summary;

pub enum Row {
    Section(String),
    Line {
        what: String,
        median: String,
        figure: String,
        target: String,
        met: Option<bool>,
    },
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    pub json: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    pub fn section(&mut self, title: impl Into<String>) {
        self.rows.push(Row::Section(title.into()));
    }

    pub fn line(
        &mut self,
        what: impl Into<String>,
        median: impl Into<String>,
        figure: impl Into<String>,
        target: impl Into<String>,
        met: Option<bool>,
    ) {
        self.rows.push(Row::Line {
            what: what.into(),
            median: median.into(),
            figure: figure.into(),
            target: target.into(),
            met,
        });
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    pub fn record(&mut self, key: &str, value: impl serde::Serialize) {
        self.json.insert(
            key.to_owned(),
            serde_json::to_value(value).unwrap_or_default(),
        );
    }

    fn cells(&self) -> Vec<Option<[String; 5]>> {
        self.rows
            .iter()
            .map(|r| match r {
                Row::Section(_) => None,
                Row::Line {
                    what,
                    median,
                    figure,
                    target,
                    met,
                } => Some([
                    what.clone(),
                    median.clone(),
                    figure.clone(),
                    target.clone(),
                    match met {
                        Some(true) => "met".into(),
                        Some(false) => "MISSED".into(),
                        None => String::new(),
                    },
                ]),
            })
            .collect()
    }

    pub fn text(&self) -> String {
        let header = ["measurement", "median", "ratio / figure", "target", ""];
        let cells = self.cells();
        let mut w = header.map(str::len);
        for c in cells.iter().flatten() {
            for (i, s) in c.iter().enumerate() {
                w[i] = w[i].max(s.chars().count());
            }
        }
        let pad =
            |s: &str, n: usize| format!("{s}{}", " ".repeat(n.saturating_sub(s.chars().count())));
        let mut out = String::new();
        let line = |c: &[String; 5]| {
            format!(
                "{}  {}{}  {}  {}  {}",
                pad(&c[0], w[0]),
                " ".repeat(w[1].saturating_sub(c[1].chars().count())),
                c[1],
                pad(&c[2], w[2]),
                pad(&c[3], w[3]),
                c[4]
            )
            .trim_end()
            .to_owned()
        };
        let _ = writeln!(out, "{}", line(&header.map(str::to_owned)));
        for (row, c) in self.rows.iter().zip(&cells) {
            match (row, c) {
                (Row::Section(t), _) => {
                    let _ = writeln!(out, "\n{t}");
                }
                (_, Some(c)) => {
                    let _ = writeln!(out, "  {}", line(c));
                }
                _ => {}
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "\nnote: {n}");
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| measurement | median | ratio / figure | target | |\n|---|--:|---|---|---|\n",
        );
        for (row, c) in self.rows.iter().zip(self.cells()) {
            match (row, c) {
                (Row::Section(t), _) => {
                    let _ = writeln!(out, "| **{t}** | | | | |");
                }
                (_, Some(c)) => {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} |",
                        c[0], c[1], c[2], c[3], c[4]
                    );
                }
                _ => {}
            }
        }
        out
    }
}

/// `1.013× [0.998–1.027]`: a paired ratio's median and interval.
pub fn ratio(s: &Summary) -> String {
    if s.n == 0 {
        return "-".into();
    }
    if s.n < 6 {
        return format!("{:.3}×", s.median);
    }
    format!("{:.3}× [{:.3}–{:.3}]", s.median, s.lo, s.hi)
}

/// Nanoseconds, µs or ms, three significant digits.
pub fn time_ns(ns: f64) -> String {
    if !ns.is_finite() {
        "-".into()
    } else if ns < 10_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 10_000_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{:.1} ms", ns / 1e6)
    }
}

pub fn ms(ns: f64) -> String {
    if ns.is_finite() {
        format!("{:.1} ms", ns / 1e6)
    } else {
        "-".into()
    }
}

pub fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}
