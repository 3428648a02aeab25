//! Which sockets on reserved ports the guard would refuse: the conflict scan of `check` and of
//! the daemon's start.

use std::collections::HashMap;

use crate::{
    cgroup::{Cgroup2, CgroupNames, CgroupPath},
    logfmt,
    maps::Maps,
    netns::Netns,
    pin::PinDir,
    policy::{NetnsScope, NetnsSpec, Policy, ReserveSpec},
    sockets::{self, Owner, Scan, Socket},
};

/// The rules a socket is judged by: from the pins when a guard is loaded, else from the config.
pub struct View {
    pub source: &'static str,
    pub attach: CgroupPath,
    pub ranges: Vec<(ReserveSpec, Vec<CgroupPath>)>,
    /// Leased port → lessee path (None when its cgroup is gone).
    pub leases: HashMap<u16, Option<CgroupPath>>,
}

impl View {
    pub fn from_policy(p: &Policy) -> View {
        View {
            source: "config",
            attach: p.attach.clone(),
            ranges: p
                .reserve
                .iter()
                .map(|r| (r.spec, r.allow.clone()))
                .collect(),
            leases: HashMap::new(),
        }
    }

    /// From the pins, or None when no guard is loaded there.
    pub fn from_pins(pin: &PinDir, cg: &Cgroup2) -> Option<View> {
        let maps = Maps::open(pin).ok()?;
        View::from_maps(&maps, cg).ok()
    }

    /// From the maps: the ranges with their allowed cgroups, and the leases, by path.
    pub fn from_maps(maps: &Maps, cg: &Cgroup2) -> Result<View, crate::maps::MapsError> {
        let mut names = CgroupNames::new(cg);
        let settings = maps.settings()?;
        let allowed = maps.allowed()?;
        let mut path = |id: u64| names.lookup(id).ok().flatten();
        let ranges = maps
            .ranges()
            .into_iter()
            .map(|r| {
                let allow = allowed
                    .iter()
                    .filter(|(_, mask)| *mask & r.bit() != 0)
                    .filter_map(|(id, _)| path(*id))
                    .collect();
                (r.spec, allow)
            })
            .collect();
        let leases = maps
            .leases()
            .all()?
            .into_iter()
            .map(|(port, l)| (port, path(l.cgroup_id)))
            .collect();
        Ok(View {
            source: "pins",
            attach: path(settings.attach_id).unwrap_or_else(CgroupPath::root),
            ranges,
            leases,
        })
    }

    pub fn reserved(&self, port: u16, protocol: &str) -> bool {
        self.range_of(port, protocol).is_some()
    }

    fn range_of(&self, port: u16, protocol: &str) -> Option<&(ReserveSpec, Vec<CgroupPath>)> {
        self.ranges
            .iter()
            .find(|(s, _)| s.range.contains(port) && s.protocols.names().contains(&protocol))
    }

    /// What the guard would do with a bind of `port`/`protocol` from `cgroup`, as
    /// (refuse, why).
    pub fn judge(&self, port: u16, protocol: &str, cgroup: Option<&CgroupPath>) -> (bool, String) {
        let Some((_, allow)) = self.range_of(port, protocol) else {
            return (false, "not reserved".into());
        };
        let Some(cg) = cgroup else {
            return (true, "owner unknown".into());
        };
        if !cg.is_within(&self.attach) {
            return (false, format!("outside the attach cgroup {}", self.attach));
        }
        if let Some(lessee) = self.leases.get(&port) {
            return match lessee {
                Some(l) if cg.is_within(l) => (false, format!("lessee {l}")),
                Some(l) => (true, format!("leased to {l}")),
                None => (true, "leased to a removed cgroup".into()),
            };
        }
        match allow.iter().find(|a| cg.is_within(a)) {
            Some(a) => (false, format!("allowed via {a}")),
            None => (true, "not allowed".into()),
        }
    }

    /// The unit a bind of `port`/`protocol` from `cgroup` is counted for: the child of the
    /// shallowest allowed cgroup on its path (or that cgroup itself), when it is allowed by the
    /// range and not leased.
    pub fn unit_of(
        &self,
        port: u16,
        protocol: &str,
        cgroup: Option<&CgroupPath>,
    ) -> Option<CgroupPath> {
        let (_, allow) = self.range_of(port, protocol)?;
        let cg = cgroup?;
        if self.leases.contains_key(&port) {
            return None;
        }
        let a = allow
            .iter()
            .filter(|a| cg.is_within(a))
            .min_by_key(|a| a.level())?;
        let below: Vec<&str> = cg.components().skip(a.level() as usize).take(1).collect();
        match below.first() {
            Some(name) => a.join(name).ok(),
            None => Some(a.clone()),
        }
    }
}

/// A socket on a reserved port with the verdict for each owner.
#[derive(Debug, serde::Serialize)]
pub struct Holder {
    pub port: u16,
    pub protocol: &'static str,
    pub family: &'static str,
    pub state: &'static str,
    pub pid: Option<u32>,
    pub command: Option<String>,
    pub cgroup: Option<String>,
    /// The network namespace it is in (`host`, or the guarded netns's name).
    pub netns: String,
    /// The guard would refuse this process the port: a conflict.
    pub would_refuse: bool,
    pub reason: String,
    /// Where the bind was allowed by a range's allowed cgroup: the unit its per-child share is
    /// counted for (the child of that allowed cgroup on the owner's path, or the allowed cgroup
    /// itself).
    pub unit: Option<String>,
}

/// Scans the sockets on reserved ports of every guarded netns of `scope` (this one for `all`)
/// and judges each owner. Also returns a note for each listed netns that does not exist.
pub fn find_in(view: &View, scope: &NetnsScope) -> (Scan, Vec<Holder>, Vec<String>) {
    find_in_until(view, scope, None)
}

/// [`find_in`], naming owners until `deadline` at most (the scan says when it gave up).
pub fn find_in_until(
    view: &View,
    scope: &NetnsScope,
    deadline: impl Into<Option<std::time::Instant>>,
) -> (Scan, Vec<Holder>, Vec<String>) {
    let deadline = deadline.into();
    let mut notes = Vec::new();
    // Here first, whether guarded or not: its scan's facts (source, visibility) are the
    // report's.
    let (mut scan, mut holders) = find_until(view, "host", deadline);
    let here_guarded = matches!(scope, NetnsScope::All) || scope.specs().contains(&NetnsSpec::Host);
    if !here_guarded {
        holders.clear();
    }
    for spec in scope.specs() {
        let NetnsSpec::Path(path) = spec else {
            continue;
        };
        match Netns::open(path) {
            Ok(Some(ns)) => match ns.run(|| find_until(view, &spec.name(), deadline)) {
                Ok((s, h)) => {
                    scan.partial |= s.partial;
                    holders.extend(h);
                }
                Err(e) => notes.push(format!("netns {}: {e}", spec.name())),
            },
            Ok(None) => notes.push(format!(
                "netns {} does not exist (yet): nothing to scan there",
                spec.name()
            )),
            Err(e) => notes.push(format!("netns {}: {e}", spec.name())),
        }
    }
    (scan, holders, notes)
}

/// Scans the sockets on reserved ports of this thread's netns (named `netns`) and judges each
/// owner.
pub fn find(view: &View, netns: &str) -> (Scan, Vec<Holder>) {
    find_until(view, netns, None)
}

fn find_until(
    view: &View,
    netns: &str,
    deadline: Option<std::time::Instant>,
) -> (Scan, Vec<Holder>) {
    let scan = sockets::scan_until(|port, proto| view.reserved(port, proto), deadline);
    let mut out = Vec::new();
    for s in &scan.sockets {
        let Socket {
            port,
            protocol,
            family,
            state,
            owners,
            ..
        } = s;
        if owners.is_empty() {
            // A TIME-WAIT left by a connection whose process is gone: nobody holds the port,
            // and binds with SO_REUSEADDR (libvirt's probe, qemu's listener) are not blocked.
            let (would_refuse, reason) = if *state == "time-wait" {
                (
                    false,
                    "TIME-WAIT of a closed connection: not held; SO_REUSEADDR binds pass".into(),
                )
            } else {
                view.judge(*port, protocol, None)
            };
            out.push(Holder {
                port: *port,
                protocol,
                family,
                state,
                pid: None,
                command: None,
                cgroup: None,
                netns: netns.to_owned(),
                would_refuse,
                reason,
                unit: None,
            });
        }
        for Owner {
            pid,
            command,
            cgroup,
        } in owners
        {
            let (would_refuse, reason) = view.judge(*port, protocol, cgroup.as_ref());
            out.push(Holder {
                port: *port,
                protocol,
                family,
                state,
                pid: Some(*pid),
                command: Some(command.clone()),
                cgroup: cgroup.as_ref().map(ToString::to_string),
                netns: netns.to_owned(),
                would_refuse,
                reason,
                unit: view
                    .unit_of(*port, protocol, cgroup.as_ref())
                    .map(|u| u.to_string()),
            });
        }
    }
    (scan, out)
}

/// The one-line form used by the daemon's warnings (logfmt values: a command or cgroup name
/// cannot forge a field).
pub fn describe(h: &Holder) -> String {
    format!(
        "port={}/{} family={} state={} pid={} comm={} cgroup={} netns={} guard={}",
        h.port,
        h.protocol,
        h.family,
        h.state,
        h.pid.map(|p| p.to_string()).unwrap_or("?".into()),
        logfmt::value(h.command.as_deref().unwrap_or("?")),
        logfmt::value(h.cgroup.as_deref().unwrap_or("?")),
        logfmt::value(&h.netns),
        logfmt::value(&if h.would_refuse {
            format!("would-refuse ({})", h.reason)
        } else {
            format!("permits ({})", h.reason)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> CgroupPath {
        s.parse().unwrap()
    }

    #[test]
    fn judges_like_the_kernel_program() {
        let view = View {
            source: "config",
            attach: p("/"),
            ranges: vec![(
                "49152-49215/tcp".parse().unwrap(),
                vec![p("/machine.slice")],
            )],
            leases: [(49160u16, Some(p("/port-guard/vm1")))]
                .into_iter()
                .collect(),
        };
        assert!(
            !view.judge(49152, "udp", Some(&p("/x"))).0,
            "udp not covered"
        );
        assert!(
            !view.judge(49151, "tcp", Some(&p("/x"))).0,
            "outside the range"
        );
        assert!(
            view.judge(49152, "tcp", Some(&p("/system.slice/glusterd.service")))
                .0
        );
        assert!(
            !view
                .judge(49152, "tcp", Some(&p("/machine.slice/qemu-1/emulator")))
                .0
        );
        assert!(
            view.judge(49160, "tcp", Some(&p("/machine.slice"))).0,
            "leased: allowed is not enough"
        );
        assert!(!view.judge(49160, "tcp", Some(&p("/port-guard/vm1/sub"))).0);
        assert!(
            view.judge(49152, "tcp", None).0,
            "unknown owner counts as a conflict"
        );
    }

    #[test]
    fn a_socket_is_counted_for_the_child_of_the_allowed_cgroup() {
        let view = View {
            source: "config",
            attach: CgroupPath::root(),
            ranges: vec![(
                "49152-49215".parse().unwrap(),
                vec![p("/machine.slice"), p("/system.slice/libvirtd.service")],
            )],
            leases: [(49160, Some(p("/port-guard/vm1")))].into(),
        };
        let unit = |port, cg: &str| {
            view.unit_of(port, "tcp", Some(&p(cg)))
                .map(|u| u.to_string())
        };
        assert_eq!(
            unit(49152, "/machine.slice/qemu-1.scope/libvirt/emulator").as_deref(),
            Some("/machine.slice/qemu-1.scope")
        );
        assert_eq!(
            unit(49152, "/system.slice/libvirtd.service").as_deref(),
            Some("/system.slice/libvirtd.service")
        );
        assert_eq!(unit(49160, "/port-guard/vm1"), None, "leased: not counted");
        assert_eq!(unit(49152, "/user.slice"), None, "not allowed");
    }
}
