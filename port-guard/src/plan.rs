//! What a config would change against a loaded guard, for `check --config`: pure, from the
//! guard's [`Status`] and the new [`Policy`].

use crate::{policy::Policy, status::Status};

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

pub fn plan(policy: &Policy, s: &Status) -> Plan {
    let mut p = Plan::default();
    let mut change = |what: &str, from: &str, to: &str| {
        if from != to {
            p.changes.push(format!("{what}: {from} -> {to}"));
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
    let attach_changes = s.attach != policy.attach.as_str();
    if attach_changes {
        p.changes
            .push(format!("attach: {} -> {}", s.attach, policy.attach));
    }

    for r in &s.reserve {
        let kept = policy
            .reserve
            .iter()
            .find(|n| n.spec.range.first == r.first && n.spec.range.last == r.last);
        match kept {
            None => p.changes.push(format!(
                "range {}/{} removed (its counters end)",
                r.ports,
                r.protocols.join("+")
            )),
            Some(n) => {
                let protos = n.spec.protocols.names().join("+");
                if protos != r.protocols.join("+") {
                    p.changes.push(format!(
                        "range {}: protocols {} -> {protos}",
                        r.ports,
                        r.protocols.join("+")
                    ));
                }
                // Allowed cgroups against what the daemon configured (present or not), else
                // against what the guard allows now.
                let mut old: Vec<String> = if r.allow_configured.is_empty() {
                    r.allow.clone()
                } else {
                    r.allow_configured.iter().map(|a| a.path.clone()).collect()
                };
                let mut new: Vec<String> = n.allow.iter().map(ToString::to_string).collect();
                old.sort();
                new.sort();
                for a in new.iter().filter(|a| !old.contains(a)) {
                    p.changes
                        .push(format!("range {}: allow {a} (added)", r.ports));
                }
                for a in old.iter().filter(|a| !new.contains(a)) {
                    p.changes
                        .push(format!("range {}: allow {a} (removed)", r.ports));
                }
            }
        }
    }
    for n in &policy.reserve {
        if !s
            .reserve
            .iter()
            .any(|r| n.spec.range.first == r.first && n.spec.range.last == r.last)
        {
            p.changes.push(format!(
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
            ));
        }
    }

    if attach_changes && s.daemon.running {
        p.problems.push(Problem {
            fatal: true,
            detail: format!(
                "attach differs ({} in force, {} in the file): a reload refuses it; restart the daemon to move the guard",
                s.attach, policy.attach
            ),
        });
    }
    for l in &s.leases {
        let covered = policy.reserve.iter().any(|r| {
            u32::from(r.spec.range.first) <= l.port && l.port <= u32::from(r.spec.range.last)
        });
        if !covered {
            p.problems.push(Problem {
                fatal: false,
                detail: format!(
                    "port {} is leased to {}, and no range of the file covers it: after a reload that lease is not enforced",
                    l.port, l.cgroup
                ),
            });
        }
    }
    p
}
