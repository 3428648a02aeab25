//! Denials, from the kernel to the log: ring buffer records turned into the log line of SPEC.md,
//! and the summaries that stand in for the lines a flood does not get.
//!
//! A flood costs little and hides nothing. The programs send an event for an offending cgroup's
//! first denial and then a few a second at most (`PG_OFFENDERS`, by cgroup); the
//! denials they do not send are counted there, and [`DenialLog::summarise`] logs them every few
//! seconds as "N more denials by X". The daemon's own cap on lines ([`LOG_LINES_PER_SEC`]) is a
//! last resort for many offenders at once, and what it drops is folded into the same summaries.
//! The kernel counters stay exact whatever happens to lines.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use log::warn;
use port_guard_common::{DenialEvent, Offender, ACTION_AUDITED, DENIAL_EVENT_V1_LEN, PROTO_UDP};

use crate::{cgroup::CgroupNames, logfmt, maps::Maps, policy::Errno};

/// Denial lines logged per second at most (for all offenders together).
pub const LOG_LINES_PER_SEC: u32 = 200;
/// Events handled per wake-up before the loop looks at its other work.
const EVENTS_PER_TURN: usize = 4096;
/// How often denials that got no line are summarised.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(5);
/// Offenders named one by one in a summary; the rest are one line together.
const SUMMARY_LINES: usize = 20;
/// Cgroups whose dropped lines are remembered between summaries.
const UNLOGGED_MAX: usize = 4096;

/// Decodes one ring buffer record: a whole [`DenialEvent`], or one of an older program (the
/// first [`DENIAL_EVENT_V1_LEN`] bytes: no netns cookie) that ran until a new daemon took over.
pub fn decode(bytes: &[u8]) -> Option<DenialEvent> {
    let mut whole = [0u8; size_of::<DenialEvent>()];
    let n = bytes.len().min(whole.len());
    if n < DENIAL_EVENT_V1_LEN {
        return None;
    }
    whole[..n].copy_from_slice(&bytes[..n]);
    // SAFETY: DenialEvent is plain old data of exactly these bytes; read_unaligned copes with
    // the array's alignment.
    Some(unsafe { std::ptr::read_unaligned(whole.as_ptr().cast::<DenialEvent>()) })
}

/// A command name, up to its NUL.
pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn proto_name(protocol: u8) -> &'static str {
    if u16::from(protocol) == PROTO_UDP {
        "udp"
    } else {
        "tcp"
    }
}

/// `denied bind port=49152/tcp family=ipv6 pid=4242 comm=glusterfsd cgroup=/x netns=host
/// errno=EADDRINUSE`, or in audit mode `audit: would deny bind ...` with the errno enforce mode
/// would give. The comm, cgroup and netns are logfmt values: quoted when they hold anything that
/// could forge a field.
pub fn log_line(
    ev: &DenialEvent,
    cgroup: &str,
    netns: &str,
    audit_errno: Errno,
    retval: bool,
) -> String {
    describe(ev, cgroup, netns, audit_errno, retval)
}

/// What a refused bind got, or in audit mode would have got (EPERM where the kernel cannot set
/// the configured errno).
fn errno_of(ev: &DenialEvent, audit_errno: Errno, retval: bool) -> Errno {
    if ev.action != ACTION_AUDITED {
        Errno::from_raw(ev.errno).unwrap_or(Errno::Eperm)
    } else if retval {
        audit_errno
    } else {
        Errno::Eperm
    }
}

/// `port=P/proto family=ipvN pid=N comm=C`: the fields every denial line has.
fn fields(ev: &DenialEvent) -> String {
    format!(
        "port={}/{} family=ipv{} pid={} comm={}",
        ev.port,
        proto_name(ev.protocol),
        ev.family,
        ev.tgid,
        logfmt::value(&comm(&ev.comm)),
    )
}

/// The denial as [`log_line`] writes it.
fn describe(
    ev: &DenialEvent,
    cgroup: &str,
    netns: &str,
    audit_errno: Errno,
    retval: bool,
) -> String {
    format!(
        "{} bind {} cgroup={} netns={} errno={}{}",
        if ev.action == ACTION_AUDITED {
            "audit: would deny"
        } else {
            "denied"
        },
        fields(ev),
        logfmt::value(cgroup),
        logfmt::value(netns),
        errno_of(ev, audit_errno, retval).c_name(),
        if ev.leased != 0 {
            " leased=other-cgroup"
        } else {
            ""
        },
    )
}

/// An offender's last denial as an event, for its summary.
fn last_denial(cgroup_id: u64, o: &Offender) -> DenialEvent {
    DenialEvent {
        cgroup_id,
        pid: o.last_tgid,
        tgid: o.last_tgid,
        port: o.last_port,
        protocol: o.last_protocol,
        family: o.last_family,
        action: o.last_action,
        leased: 0,
        _pad: [0; 2],
        errno: o.last_errno,
        comm: o.last_comm,
        netns_cookie: 0,
    }
}

/// Names network namespaces in denial lines: `host`, an `ip netns` name or the configured path,
/// else the inode number of the refused process's netns, else `?`.
#[derive(Default)]
pub struct NetnsNames {
    /// Guarded namespaces: cookie → name.
    by_cookie: HashMap<u64, String>,
    /// Guarded namespaces: inode → name.
    by_inode: HashMap<u64, String>,
    /// Others seen in events (audit mode with `netns = "all"`), bounded.
    seen: HashMap<u64, String>,
}

impl NetnsNames {
    /// The guarded namespaces: (cookie, inode, name) each.
    pub fn set(&mut self, guarded: impl IntoIterator<Item = (u64, u64, String)>) {
        self.by_cookie.clear();
        self.by_inode.clear();
        for (cookie, inode, name) in guarded {
            self.by_cookie.insert(cookie, name.clone());
            self.by_inode.insert(inode, name);
        }
    }

    /// The name of the netns of `ev`.
    pub fn name(&mut self, ev: &DenialEvent) -> String {
        let cookie = ev.netns_cookie;
        if let Some(n) = self.by_cookie.get(&cookie).or(self.seen.get(&cookie)) {
            return n.clone();
        }
        // Not a guarded one (or no cookie): the refused process's netns, while it lives.
        let Ok(inode) = std::fs::metadata(format!("/proc/{}/ns/net", ev.tgid))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        else {
            return "?".into();
        };
        let name = self
            .by_inode
            .get(&inode)
            .cloned()
            .or_else(|| crate::netns::run_netns_name(inode))
            .unwrap_or_else(|| inode.to_string());
        if cookie != 0 {
            if self.seen.len() >= 1024 {
                self.seen.clear();
            }
            self.seen.insert(cookie, name.clone());
        }
        name
    }
}

/// Rate limit for denial lines, all offenders together.
struct LogBudget {
    window: Instant,
    used: u32,
}

impl LogBudget {
    fn take(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.used = 0;
        }
        if self.used < LOG_LINES_PER_SEC {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

/// Logs denials and summarises what got no line of its own.
pub struct DenialLog {
    budget: LogBudget,
    /// Denial events the ring buffer had no room for, as last said.
    lost_seen: u64,
    /// Per offending cgroup: its unreported denials as of the last summary.
    summarised: HashMap<u64, u64>,
    /// Per offending cgroup: events that reached the daemon but got no line (over the budget).
    unlogged: HashMap<u64, u64>,
    last_summary: Instant,
    /// Lines not written (summarised instead), for the metrics.
    pub lines_summarised: u64,
    /// How lines name network namespaces.
    pub netns: NetnsNames,
}

impl DenialLog {
    pub fn new(maps: &Maps) -> DenialLog {
        DenialLog {
            budget: LogBudget {
                window: Instant::now(),
                used: 0,
            },
            lost_seen: maps.events_lost().unwrap_or(0),
            summarised: HashMap::new(),
            unlogged: HashMap::new(),
            last_summary: Instant::now(),
            lines_summarised: 0,
            netns: NetnsNames::default(),
        }
    }

    /// Logs up to [`EVENTS_PER_TURN`] events; returns whether the ring buffer is empty.
    pub fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        names: &mut CgroupNames<'_>,
        errno: Errno,
        retval: bool,
    ) -> bool {
        for _ in 0..EVENTS_PER_TURN {
            let Some(item) = ring.next() else { return true };
            let Some(ev) = decode(&item) else {
                warn!("short event record ({} bytes)", item.len());
                continue;
            };
            drop(item);
            if self.budget.take() {
                let cgroup = names.name_for_log(ev.cgroup_id, Duration::from_secs(1));
                let netns = self.netns.name(&ev);
                warn!("{}", log_line(&ev, &cgroup, &netns, errno, retval));
            } else {
                self.lines_summarised += 1;
                if self.unlogged.len() < UNLOGGED_MAX || self.unlogged.contains_key(&ev.cgroup_id) {
                    *self.unlogged.entry(ev.cgroup_id).or_default() += 1;
                }
            }
        }
        false
    }

    /// Says when the kernel had to drop denial events (ring buffer full).
    pub fn check_lost(&mut self, maps: &Maps) {
        let Ok(now) = maps.events_lost() else { return };
        if now > self.lost_seen {
            warn!(
                "{} denial events were lost (the event ring buffer was full); the denial counters are exact, see `port-guard status`",
                now - self.lost_seen
            );
            self.lost_seen = now;
        }
    }

    /// Every [`SUMMARY_EVERY`]: one line per offender whose denials got no line of their own
    /// since the last summary (the busiest [`SUMMARY_LINES`], then one line for the rest).
    pub fn summarise(
        &mut self,
        offenders: &BpfHashMap<MapData, u64, Offender>,
        names: &mut CgroupNames<'_>,
        (errno, retval): (Errno, bool),
        force: bool,
    ) {
        if !force && self.last_summary.elapsed() < SUMMARY_EVERY {
            return;
        }
        let window = self.last_summary.elapsed();
        self.last_summary = Instant::now();
        let totals: HashMap<u64, Offender> = offenders.iter().filter_map(Result::ok).collect();
        // Forget offenders the kernel forgot.
        self.summarised.retain(|c, _| totals.contains_key(c));
        let mut news: Vec<(u64, u64, Offender)> = Vec::new();
        for (cgroup, t) in &totals {
            let unreported = t.denials.saturating_sub(t.reported);
            let last = *t;
            let before = self.summarised.insert(*cgroup, unreported).unwrap_or(0);
            let unlogged = self.unlogged.remove(cgroup).unwrap_or(0);
            let n = unreported.saturating_sub(before) + unlogged;
            if n > 0 {
                news.push((*cgroup, n, last));
            }
        }
        // Dropped lines of cgroups the kernel no longer tracks.
        for (cgroup, n) in self.unlogged.drain() {
            news.push((cgroup, n, Offender::default()));
        }
        news.sort_by_key(|x| std::cmp::Reverse(x.1));
        let secs = window.as_secs_f64().round() as u64;
        for (cgroup, n, last) in news.iter().take(SUMMARY_LINES) {
            let who =
                logfmt::value(&names.name_for_log(*cgroup, Duration::from_secs(1))).into_owned();
            if last.last_ns == 0 {
                warn!("denials summarised: {n} more denials by cgroup={who} in the last {secs} s");
            } else {
                let ev = last_denial(*cgroup, last);
                warn!(
                    "denials summarised: {n} more {} by cgroup={who} in the last {secs} s (last: {} errno={})",
                    if ev.action == ACTION_AUDITED {
                        "would-be denials (audit)"
                    } else {
                        "denials"
                    },
                    fields(&ev),
                    errno_of(&ev, errno, retval).c_name()
                );
            }
        }
        if news.len() > SUMMARY_LINES {
            let rest: u64 = news[SUMMARY_LINES..].iter().map(|x| x.1).sum();
            warn!(
                "denials summarised: {rest} more denials by {} other cgroups in the last {secs} s; `port-guard status` counts them all",
                news.len() - SUMMARY_LINES
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use port_guard_common::{ACTION_DENIED, PROTO_TCP};

    use super::*;

    fn event(action: u8, errno: u32) -> DenialEvent {
        let mut comm = [0u8; 16];
        comm[..10].copy_from_slice(b"glusterfsd");
        DenialEvent {
            cgroup_id: 7,
            pid: 4243,
            tgid: 4242,
            port: 49152,
            protocol: PROTO_TCP as u8,
            family: 6,
            action,
            leased: 0,
            _pad: [0; 2],
            errno,
            comm,
            netns_cookie: 99,
        }
    }

    #[test]
    fn formats_the_spec_line() {
        let ev = event(ACTION_DENIED, libc::EADDRINUSE as u32);
        assert_eq!(
            log_line(&ev, "/system.slice/glusterd.service", "host", Errno::Eaddrinuse, true),
            "denied bind port=49152/tcp family=ipv6 pid=4242 comm=glusterfsd cgroup=/system.slice/glusterd.service netns=host errno=EADDRINUSE"
        );
        let ev = event(ACTION_AUDITED, 0);
        assert!(log_line(&ev, "/a", "host", Errno::Eacces, true)
            .starts_with("audit: would deny bind port=49152/tcp"));
        assert!(log_line(&ev, "/a", "host", Errno::Eacces, true).ends_with("errno=EACCES"));
        assert!(log_line(&ev, "/a", "host", Errno::Eacces, false).ends_with("errno=EPERM"));
    }

    #[test]
    fn guarded_namespaces_are_named_by_cookie() {
        let mut names = NetnsNames::default();
        names.set([
            (99, 4026531833, "host".to_owned()),
            (7, 4026532000, "blue".to_owned()),
        ]);
        let mut ev = event(ACTION_DENIED, 1);
        assert_eq!(names.name(&ev), "host");
        ev.netns_cookie = 7;
        assert_eq!(names.name(&ev), "blue");
    }

    #[test]
    fn a_cgroup_or_comm_cannot_forge_fields() {
        let mut ev = event(ACTION_DENIED, libc::EADDRINUSE as u32);
        ev.comm = *b"x errno=EPERM\0\0\0";
        let line = log_line(
            &ev,
            "/x comm=libvirtd pid=1 errno=EPERM",
            "host",
            Errno::Eaddrinuse,
            true,
        );
        assert_eq!(
            line,
            "denied bind port=49152/tcp family=ipv6 pid=4242 comm=\"x errno=EPERM\" cgroup=\"/x comm=libvirtd pid=1 errno=EPERM\" netns=host errno=EADDRINUSE"
        );
        // Outside quotes, each key appears once.
        let mut outside = String::new();
        let mut quoted = false;
        let mut escaped = false;
        for c in line.chars() {
            if quoted {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    quoted = false;
                }
            } else if c == '"' {
                quoted = true;
            } else {
                outside.push(c);
            }
        }
        for key in ["comm=", "cgroup=", "netns=", "errno=", "pid="] {
            assert_eq!(outside.matches(key).count(), 1, "{key} in {line}");
        }
    }

    #[test]
    fn decodes_records() {
        let ev = event(ACTION_DENIED, 1);
        // SAFETY: reading the bytes of a POD value.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const DenialEvent).cast::<u8>(),
                size_of::<DenialEvent>(),
            )
        };
        let back = decode(bytes).unwrap();
        assert_eq!(
            (back.tgid, back.port, comm(&back.comm), back.netns_cookie),
            (4242, 49152, "glusterfsd".into(), 99)
        );
        // A record of an older program: no cookie.
        let old = decode(&bytes[..DENIAL_EVENT_V1_LEN]).unwrap();
        assert_eq!((old.tgid, old.netns_cookie), (4242, 0));
        assert!(decode(&bytes[..10]).is_none());
    }
}
