//! What a config would change against a loaded guard, for `check --config`: pure, from the
//! guard's [`Status`] and the new [`Policy`].

use crate::{
    policy::{Policy, Reservation},
    status::{RangeStatus, Status},
};

/// The differences, one sentence each, and the problems a reload would meet.
#[derive(Debug, Default, serde::Serialize)]
pub struct Plan {
    /// What would change (empty: the file matches what is in force).
    pub changes: Vec<String>,
    /// What a reload would refuse or leave unenforced.
    pub problems: Vec<Problem>,
}

#[derive(Debug, serde::Serialize)]
pub struct Problem {
    /// A reload is refused for it (else it is a warning).
    pub fatal: bool,
    pub detail: String,
}

/// What `policy` would change against the guard in `s`, and what a reload of it would meet.
pub fn plan(policy: &Policy, s: &Status) -> Plan {
    let mut changes = setting_changes(policy, s);
    for r in &s.reserve {
        changes.extend(range_changes(policy, r));
    }
    changes.extend(added_ranges(policy, s));
    let mut problems: Vec<Problem> = attach_refused(policy, s).into_iter().collect();
    problems.extend(unenforced_leases(policy, s));
    Plan { changes, problems }
}

/// The settings that change: mode, errno, protect_ephemeral, spawn_parent and netns (where the
/// guard recorded them), attach.
fn setting_changes(policy: &Policy, s: &Status) -> Vec<String> {
    let mut changes = Vec::new();
    let mut change = |what: &str, from: &str, to: &str| {
        if from != to {
            changes.push(format!("{what}: {from} -> {to}"));
        }
    };
    change("mode", s.mode, policy.mode.name());
    change("errno", s.errno, policy.errno.name());
    let onoff = |b: bool| if b { "on" } else { "off" };
    change(
        "protect_ephemeral",
        onoff(s.protect_ephemeral),
        onoff(policy.protect_ephemeral),
    );
    if !s.spawn_parent.is_empty() {
        change(
            "spawn_parent",
            &s.spawn_parent,
            policy.spawn_parent.as_str(),
        );
    }
    if !s.daemon.netns.is_empty() {
        change("netns", &s.daemon.netns, &policy.netns.to_string());
    }
    if attach_changes(policy, s) {
        changes.push(format!("attach: {} -> {}", s.attach, policy.attach));
    }
    changes
}

fn attach_changes(policy: &Policy, s: &Status) -> bool {
    s.attach != policy.attach.as_str()
}

/// What becomes of the range `r` in force: removed, or its protocols and allowed cgroups.
fn range_changes(policy: &Policy, r: &RangeStatus) -> Vec<String> {
    let kept = policy
        .reserve
        .iter()
        .find(|n| n.spec.range.first == r.first && n.spec.range.last == r.last);
    let Some(n) = kept else {
        return vec![format!(
            "range {}/{} removed (its counters end)",
            r.ports,
            r.protocols.join("+")
        )];
    };
    let mut changes = Vec::new();
    let protos = n.spec.protocols.names().join("+");
    if protos != r.protocols.join("+") {
        changes.push(format!(
            "range {}: protocols {} -> {protos}",
            r.ports,
            r.protocols.join("+")
        ));
    }
    changes.extend(allow_changes(n, r));
    changes
}

/// The allowed cgroups of the kept range `r` added and removed by `n`: against what the daemon
/// configured (present or not), else against what the guard allows now.
fn allow_changes(n: &Reservation, r: &RangeStatus) -> Vec<String> {
    let mut old: Vec<String> = if r.allow_configured.is_empty() {
        r.allow.clone()
    } else {
        r.allow_configured.iter().map(|a| a.path.clone()).collect()
    };
    let mut new: Vec<String> = n.allow.iter().map(ToString::to_string).collect();
    old.sort();
    new.sort();
    let added = new
        .iter()
        .filter(|a| !old.contains(a))
        .map(|a| format!("range {}: allow {a} (added)", r.ports));
    let removed = old
        .iter()
        .filter(|a| !new.contains(a))
        .map(|a| format!("range {}: allow {a} (removed)", r.ports));
    added.chain(removed).collect()
}

/// The ranges of `policy` that are not in force.
fn added_ranges(policy: &Policy, s: &Status) -> Vec<String> {
    policy
        .reserve
        .iter()
        .filter(|n| {
            !s.reserve
                .iter()
                .any(|r| n.spec.range.first == r.first && n.spec.range.last == r.last)
        })
        .map(|n| {
            format!(
                "range {} added{}",
                n.spec,
                if n.allow.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (allow {})",
                        n.allow
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            )
        })
        .collect()
}

/// A running daemon refuses to move the guard to another attach cgroup on reload.
fn attach_refused(policy: &Policy, s: &Status) -> Option<Problem> {
    (attach_changes(policy, s) && s.daemon.running).then(|| Problem {
        fatal: true,
        detail: format!(
            "attach differs ({} in force, {} in the file): a reload refuses it; restart the daemon to move the guard",
            s.attach, policy.attach
        ),
    })
}

/// The leases on ports no range of `policy` covers: not enforced after a reload.
fn unenforced_leases<'a>(policy: &'a Policy, s: &'a Status) -> impl Iterator<Item = Problem> + 'a {
    s.leases
        .iter()
        .filter(|l| {
            !policy.reserve.iter().any(|r| {
                u32::from(r.spec.range.first) <= l.port && l.port <= u32::from(r.spec.range.last)
            })
        })
        .map(|l| Problem {
            fatal: false,
            detail: format!(
                "port {} is leased to {}, and no range of the file covers it: after a reload that lease is not enforced",
                l.port, l.cgroup
            ),
        })
}
