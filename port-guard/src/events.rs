//! Denials, from the kernel to the log: ring buffer records turned into the daemon's denial lines
//! (their fields are listed in docs/design.md, "Log lines"), and the summaries that stand in for
//! the lines a flood does not get.
//!
//! A flood costs little and hides nothing. The programs send an event for an offender's first
//! denial and then a few a second at most; the offender is the refused process's uid (every
//! cgroup of a user together, so that making cgroups buys no lines) or, for root's processes, its
//! cgroup (`PG_BUDGET`). The denials they do not send are counted there, and per cgroup for
//! users (`PG_CG_DENIALS`), and [`DenialLog::summarise`] logs them every few seconds as "N more
//! denials by X", naming a user's busiest cgroups. The daemon's own cap on lines
//! ([`LOG_LINES_PER_SEC`]) is a last resort for many offenders at once, and what it drops is
//! folded into the same summaries. The kernel counters stay exact whatever happens to lines.
//!
//! A line never waits for a name: a cgroup the daemon cannot name at once (no file handles here,
//! and not yet found by the background walk) is written `cgroup_id=N`.

use std::{
    collections::HashMap,
    os::fd::AsFd as _,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use log::warn;
use port_guard_common::{
    CgroupDenials, DenialEvent, Offender, ACTION_AUDITED, BUDGET_UID, DENIAL_EVENT_V1_LEN,
    MAX_CGROUP_DENIALS, MAX_OFFENDERS, PROTO_UDP, REASON_LEASED, REASON_LIMIT, STAT_BUDGET_NEW,
    STAT_CGROUP_NEW,
};

use crate::{logfmt, maps::Maps, policy::Errno};

/// Denial lines logged per second at most (for all offenders together).
pub const LOG_LINES_PER_SEC: u32 = 200;
/// Events handled per wake-up before the loop looks at its other work.
const EVENTS_PER_TURN: usize = 4096;
/// How often denials that got no line are summarised.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(5);
/// Offenders named one by one in a summary; the rest are one line together.
const SUMMARY_LINES: usize = 20;
/// A user's cgroups named in its summary line, busiest first.
const SUMMARY_CGROUPS: usize = 3;
/// Offenders whose dropped lines are remembered between summaries.
const UNLOGGED_MAX: usize = 4096;
/// A refusal logged this long after it happened says when it happened (`late=`, `at=`).
const LATE_AFTER: Duration = Duration::from_secs(1);

/// Decodes one ring buffer record: a whole [`DenialEvent`], or one of an older program (the
/// first [`DENIAL_EVENT_V1_LEN`] bytes and more: the fields it lacks are 0) that ran until a new
/// daemon took over.
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

/// Names cgroups for log lines without waiting: `None` when the name is not known at once.
pub trait CgroupNamer {
    fn name_now(&mut self, id: u64) -> Option<String>;
}

/// `cgroup=/path`, or `cgroup_id=N` when the name is not known at once.
fn cgroup_field(key: &str, id: u64, names: &mut dyn CgroupNamer) -> String {
    match names.name_now(id) {
        Some(name) => format!("{key}={}", logfmt::value(&name)),
        None => format!("{key}_id={id}"),
    }
}

/// What a refused bind got, or in audit mode would have got: the programs record it either way.
/// Records of older programs have 0 in audit mode: then the configured errno where the kernel can
/// set it, else EPERM.
fn errno_of(ev: &DenialEvent, configured: Errno, retval: bool) -> Errno {
    match Errno::from_raw(ev.errno) {
        Some(e) => e,
        None if ev.action == ACTION_AUDITED && retval => configured,
        None => Errno::Eperm,
    }
}

/// `port=P/proto family=ipvN pid=N comm=C`: the fields every denial line has.
fn fields(port: u16, protocol: u8, family: u8, tgid: u32, raw_comm: &[u8; 16]) -> String {
    format!(
        "port={}/{} family=ipv{} pid={} comm={}",
        port,
        proto_name(protocol),
        family,
        tgid,
        logfmt::value(&comm(raw_comm)),
    )
}

/// `errno=E` for a refusal, `would_errno=E` for what audit mode let through.
fn errno_field(action: u8, errno: Errno) -> String {
    if action == ACTION_AUDITED {
        format!("would_errno={}", errno.c_name())
    } else {
        format!("errno={}", errno.c_name())
    }
}

fn reason_name(reason: u8) -> &'static str {
    match reason {
        REASON_LEASED => "leased",
        REASON_LIMIT => "limit",
        _ => "not_allowed",
    }
}

/// Clocks for the time of a refusal: the event carries CLOCK_BOOTTIME.
pub trait Clock {
    /// CLOCK_BOOTTIME now, in nanoseconds.
    fn boot_ns(&self) -> u64;
    fn wall(&self) -> SystemTime;
}

/// The host's clocks.
pub struct HostClock;

impl Clock for HostClock {
    fn boot_ns(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to write into.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// ` late=2m14s at=2026-12-03T09:18:36.123Z` for a refusal logged [`LATE_AFTER`] or more after
/// it happened (events wait in the ring buffer while no daemon runs); empty otherwise.
fn lateness(time_ns: u64, clock: &dyn Clock) -> String {
    if time_ns == 0 {
        return String::new();
    }
    let lag = Duration::from_nanos(clock.boot_ns().saturating_sub(time_ns));
    if lag < LATE_AFTER {
        return String::new();
    }
    let at = clock
        .wall()
        .checked_sub(lag)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    format!(" late={} at={}", short_duration(lag), rfc3339_millis(at))
}

/// `850ms`, `14s`, `2m14s`, `3h2m`, `2d3h`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// `2026-12-03T09:18:36.123Z`.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rest) = (secs / 86400, secs % 86400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        d.subsec_millis()
    )
}

/// The line of one refusal, the SPEC's:
/// `denied bind port=49152/tcp family=ipv6 pid=4242 comm=glusterfsd
/// cgroup=/system.slice/glusterd.service netns=host errno=EADDRINUSE`, then only what applies:
/// ` reason=leased`, or ` reason=limit unit=… held=N limit=N` for a unit at its limit; ` uid=N`
/// for a process not root's; ` late=… at=…` when logged late. In audit mode: `audit: would deny
/// bind …` and `would_errno=` (what enforce mode would return; nothing was).
pub fn log_line(
    ev: &DenialEvent,
    names: &mut dyn CgroupNamer,
    netns: &str,
    (configured, retval): (Errno, bool),
    clock: &dyn Clock,
) -> String {
    let mut line = format!(
        "{} bind {} {} netns={} {}",
        if ev.action == ACTION_AUDITED {
            "audit: would deny"
        } else {
            "denied"
        },
        fields(ev.port, ev.protocol, ev.family, ev.tgid, &ev.comm),
        cgroup_field("cgroup", ev.cgroup_id, names),
        logfmt::value(netns),
        errno_field(ev.action, errno_of(ev, configured, retval)),
    );
    match ev.reason {
        REASON_LEASED => line.push_str(" reason=leased"),
        REASON_LIMIT => {
            line.push_str(" reason=limit ");
            line.push_str(&cgroup_field("unit", ev.unit_id, names));
            line.push_str(&format!(" held={} limit={}", ev.held, ev.limit));
        }
        _ => {}
    }
    if ev.uid != 0 {
        line.push_str(&format!(" uid={}", ev.uid));
    }
    line.push_str(&lateness(ev.time_ns, clock));
    line
}

/// Names network namespaces in denial lines from the event's netns cookie alone: `host`, an
/// `ip netns` name or the configured path for a guarded one, else `cookie:N` (a refusal from a
/// thread that entered a netns of its own is named by that netns, not by its process's).
#[derive(Default)]
pub struct NetnsNames {
    /// Guarded namespaces: cookie → name.
    by_cookie: HashMap<u64, String>,
}

impl NetnsNames {
    /// The guarded namespaces: (cookie, inode, name) each.
    pub fn set(&mut self, guarded: impl IntoIterator<Item = (u64, u64, String)>) {
        self.by_cookie = guarded
            .into_iter()
            .map(|(cookie, _, name)| (cookie, name))
            .collect();
    }

    /// The name of the netns with `cookie`.
    pub fn name(&self, cookie: u64) -> String {
        match self.by_cookie.get(&cookie) {
            Some(n) => n.clone(),
            None if cookie == 0 => "?".into(),
            None => format!("cookie:{cookie}"),
        }
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

/// The kernel's per-offender maps, read whole for a summary.
pub struct OffenderMaps {
    pub budget: aya::maps::HashMap<MapData, u64, Offender>,
    pub cgroups: Option<aya::maps::HashMap<MapData, u64, CgroupDenials>>,
}

impl OffenderMaps {
    fn budget(&self) -> Vec<(u64, Offender)> {
        read_all(&self.budget)
    }

    fn cgroups(&self) -> Vec<(u64, CgroupDenials)> {
        self.cgroups.as_ref().map(read_all).unwrap_or_default()
    }
}

/// Every entry of an LRU map, in a few batched syscalls (a walk would cost two per entry).
fn read_all<V: aya::Pod>(m: &aya::maps::HashMap<MapData, u64, V>) -> Vec<(u64, V)> {
    let fd = aya::maps::IterableMap::map(m).fd().as_fd();
    match crate::sys::read_all::<u64, V>(fd, 4096) {
        Ok(v) => v,
        // Batched lookups need 5.6 (LRU maps: every kernel the guard runs on); a walk else.
        Err(_) => m.iter().filter_map(Result::ok).collect(),
    }
}

/// What the LRU maps forgot: keys added beyond their size evicted the least recently refused.
#[derive(Clone, Copy, Debug, Default)]
pub struct Evictions {
    pub offenders: u64,
    pub cgroups: u64,
}

/// The key of the offender of `ev` in `PG_BUDGET`.
fn key_of(ev: &DenialEvent) -> u64 {
    port_guard_common::budget_key(ev.uid, ev.cgroup_id)
}

/// Logs denials and summarises what got no line of its own.
pub struct DenialLog {
    budget: LogBudget,
    /// Denial events the ring buffer had no room for, as last said.
    lost_seen: u64,
    /// Per offender: its unreported denials as of the last summary.
    summarised: HashMap<u64, u64>,
    /// Per offender: events that reached the daemon but got no line (over the budget).
    unlogged: HashMap<u64, u64>,
    /// Per cgroup of a non-root offender: its denials as of the last summary.
    cgroup_seen: HashMap<u64, u64>,
    last_summary: Instant,
    /// Lines not written (summarised instead), for the metrics.
    pub lines_summarised: u64,
    /// How lines name network namespaces.
    pub netns: NetnsNames,
    /// As of the last summary.
    pub evicted: Evictions,
    clock: Box<dyn Clock + Send>,
}

/// One offender's news for a summary.
struct News {
    key: u64,
    n: u64,
    last: Offender,
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
            cgroup_seen: HashMap::new(),
            last_summary: Instant::now(),
            lines_summarised: 0,
            netns: NetnsNames::default(),
            evicted: Evictions::default(),
            clock: Box::new(HostClock),
        }
    }

    /// Logs up to [`EVENTS_PER_TURN`] events; returns whether the ring buffer is empty.
    pub fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        names: &mut dyn CgroupNamer,
        errno: (Errno, bool),
    ) -> bool {
        for _ in 0..EVENTS_PER_TURN {
            let Some(item) = ring.next() else { return true };
            let Some(ev) = decode(&item) else {
                warn!("short event record ({} bytes)", item.len());
                continue;
            };
            drop(item);
            self.log(&ev, names, errno);
        }
        false
    }

    /// One event: its line, or a count for the summary when over the budget.
    pub fn log(&mut self, ev: &DenialEvent, names: &mut dyn CgroupNamer, errno: (Errno, bool)) {
        if self.budget.take() {
            let netns = self.netns.name(ev.netns_cookie);
            warn!("{}", log_line(ev, names, &netns, errno, &*self.clock));
        } else {
            self.lines_summarised += 1;
            let key = key_of(ev);
            if self.unlogged.len() < UNLOGGED_MAX || self.unlogged.contains_key(&key) {
                *self.unlogged.entry(key).or_default() += 1;
            }
        }
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
        offenders: &OffenderMaps,
        maps: &Maps,
        names: &mut dyn CgroupNamer,
        errno: (Errno, bool),
        force: bool,
    ) {
        if !force && self.last_summary.elapsed() < SUMMARY_EVERY {
            return;
        }
        let window = self.last_summary.elapsed();
        self.last_summary = Instant::now();
        let totals = offenders.budget();
        let cgroups = if totals.iter().any(|(k, _)| k & BUDGET_UID != 0) {
            offenders.cgroups()
        } else {
            Vec::new()
        };
        self.count_evictions(maps, totals.len(), &cgroups, offenders);
        let news = self.news(&totals);
        let breakdown = self.breakdown(&cgroups);
        let secs = window.as_secs_f64().round() as u64;
        for n in news.iter().take(SUMMARY_LINES) {
            let line = summary_line(n, breakdown.get(&n.key), secs, names, errno);
            warn!("{line}");
        }
        if news.len() > SUMMARY_LINES {
            let rest: u64 = news[SUMMARY_LINES..].iter().map(|x| x.n).sum();
            warn!(
                "denials summarised: {rest} more denials by {} other offenders in the last {secs} s; `port-guard status` counts them all",
                news.len() - SUMMARY_LINES
            );
        }
    }

    /// Offenders with denials that got no line since the last summary, busiest first.
    fn news(&mut self, totals: &[(u64, Offender)]) -> Vec<News> {
        // Forget offenders the kernel forgot.
        self.summarised
            .retain(|k, _| totals.iter().any(|(t, _)| t == k));
        let mut news = Vec::new();
        for (key, t) in totals {
            let unreported = t.denials.saturating_sub(t.reported);
            let before = self.summarised.insert(*key, unreported).unwrap_or(0);
            let unlogged = self.unlogged.remove(key).unwrap_or(0);
            let n = unreported.saturating_sub(before) + unlogged;
            if n > 0 {
                news.push(News {
                    key: *key,
                    n,
                    last: *t,
                });
            }
        }
        // Dropped lines of offenders the kernel no longer tracks.
        for (key, n) in self.unlogged.drain() {
            news.push(News {
                key,
                n,
                last: Offender::default(),
            });
        }
        news.sort_by_key(|x| std::cmp::Reverse(x.n));
        news
    }

    /// Per uid key: its cgroups that refused since the last summary, busiest first, with how
    /// many each.
    fn breakdown(&mut self, cgroups: &[(u64, CgroupDenials)]) -> HashMap<u64, Vec<(u64, u64)>> {
        let mut by_uid: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
        let mut seen = HashMap::with_capacity(cgroups.len());
        for (cgroup, c) in cgroups {
            let before = self.cgroup_seen.get(cgroup).copied().unwrap_or(0);
            seen.insert(*cgroup, c.denials);
            let n = c.denials.saturating_sub(before);
            if n > 0 {
                by_uid
                    .entry(BUDGET_UID | u64::from(c.uid))
                    .or_default()
                    .push((*cgroup, n));
            }
        }
        // Only what the kernel still tracks: bounded by its map.
        self.cgroup_seen = seen;
        for v in by_uid.values_mut() {
            v.sort_by_key(|(c, n)| (std::cmp::Reverse(*n), *c));
        }
        by_uid
    }

    /// Keys added to the LRU maps beyond what they hold were evicted.
    fn count_evictions(
        &mut self,
        maps: &Maps,
        live: usize,
        cgroups: &[(u64, CgroupDenials)],
        offenders: &OffenderMaps,
    ) {
        let Ok((budget_new, cgroup_new)) = maps
            .stat(STAT_BUDGET_NEW)
            .and_then(|b| Ok((b, maps.stat(STAT_CGROUP_NEW)?)))
        else {
            return;
        };
        // Read for the summary when a user offended; else read here, when it changed.
        let live_cgroups = if !cgroups.is_empty() || cgroup_new == 0 {
            cgroups.len() as u64
        } else {
            offenders
                .cgroups
                .as_ref()
                .map_or(0, |m| read_all(m).len() as u64)
        };
        self.evicted = Evictions {
            offenders: budget_new.saturating_sub(live as u64),
            cgroups: cgroup_new.saturating_sub(live_cgroups),
        };
        let _ = (MAX_OFFENDERS, MAX_CGROUP_DENIALS);
    }
}

/// `denials summarised: N more denials by cgroup=X in the last 5 s (last: …)`, or for a user
/// `… by uid=N in the last 5 s from 600 cgroups: cgroup1=/a n1=120 … other_cgroups=597 (last: …)`.
fn summary_line(
    n: &News,
    cgroups: Option<&Vec<(u64, u64)>>,
    secs: u64,
    names: &mut dyn CgroupNamer,
    errno: (Errno, bool),
) -> String {
    let audit = n.last.last_ns != 0 && n.last.last_action == ACTION_AUDITED;
    let what = if audit {
        "would-be denials (audit)"
    } else {
        "denials"
    };
    let mut line = if n.key & BUDGET_UID != 0 {
        let uid = n.key & !BUDGET_UID;
        let mut s = format!(
            "denials summarised: {} more {what} by uid={uid} in the last {secs} s",
            n.n
        );
        if let Some(list) = cgroups.filter(|l| !l.is_empty()) {
            s.push_str(&format!(" from {} cgroups:", list.len()));
            for (i, (cgroup, count)) in list.iter().take(SUMMARY_CGROUPS).enumerate() {
                let field = cgroup_field(&format!("cgroup{}", i + 1), *cgroup, names);
                s.push_str(&format!(" {field} n{}={count}", i + 1));
            }
            if list.len() > SUMMARY_CGROUPS {
                s.push_str(&format!(" other_cgroups={}", list.len() - SUMMARY_CGROUPS));
            }
        }
        s
    } else {
        format!(
            "denials summarised: {} more {what} by {} in the last {secs} s",
            n.n,
            cgroup_field("cgroup", n.key, names)
        )
    };
    if n.last.last_ns != 0 {
        let o = &n.last;
        let ev = DenialEvent {
            errno: o.last_errno,
            action: o.last_action,
            ..DenialEvent::default()
        };
        line.push_str(&format!(
            " (last: {}",
            fields(
                o.last_port,
                o.last_protocol,
                o.last_family,
                o.last_tgid,
                &o.last_comm
            )
        ));
        if n.key & BUDGET_UID != 0 {
            line.push(' ');
            line.push_str(&cgroup_field("cgroup", o.last_cgroup, names));
        }
        line.push(' ');
        line.push_str(&errno_field(o.last_action, errno_of(&ev, errno.0, errno.1)));
        if o.last_reason != port_guard_common::REASON_NOT_ALLOWED {
            line.push_str(&format!(" reason={}", reason_name(o.last_reason)));
        }
        line.push(')');
    }
    line
}

#[cfg(test)]
mod tests {
    use port_guard_common::{ACTION_DENIED, PROTO_TCP};

    use super::*;

    /// Names from a fixed table: what a handle lookup or the walk would find.
    struct Table(HashMap<u64, String>);

    impl CgroupNamer for Table {
        fn name_now(&mut self, id: u64) -> Option<String> {
            self.0.get(&id).cloned()
        }
    }

    fn names() -> Table {
        Table(HashMap::from([
            (7, "/system.slice/glusterd.service".to_owned()),
            (9, "/machine.slice/vm1.scope".to_owned()),
            (11, "/x comm=libvirtd pid=1 errno=EPERM".to_owned()),
        ]))
    }

    /// A clock at boot time `boot` seconds, wall time 2026-12-03T09:20:50Z.
    struct Fixed(u64);

    impl Clock for Fixed {
        fn boot_ns(&self) -> u64 {
            self.0 * 1_000_000_000
        }
        fn wall(&self) -> SystemTime {
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_289_650)
        }
    }

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
            errno,
            comm,
            netns_cookie: 99,
            time_ns: 1000 * 1_000_000_000,
            ..DenialEvent::default()
        }
    }

    const EADDRINUSE: (Errno, bool) = (Errno::Eaddrinuse, true);

    #[test]
    fn formats_the_spec_line() {
        let ev = event(ACTION_DENIED, libc::EADDRINUSE as u32);
        assert_eq!(
            log_line(&ev, &mut names(), "host", EADDRINUSE, &Fixed(1000)),
            "denied bind port=49152/tcp family=ipv6 pid=4242 comm=glusterfsd cgroup=/system.slice/glusterd.service netns=host errno=EADDRINUSE"
        );
        // Audit mode: what would have been returned, not claimed as returned.
        let ev = event(ACTION_AUDITED, libc::EACCES as u32);
        let line = log_line(
            &ev,
            &mut names(),
            "host",
            (Errno::Eacces, true),
            &Fixed(1000),
        );
        assert!(
            line.starts_with("audit: would deny bind port=49152/tcp"),
            "{line}"
        );
        assert!(line.split(' ').any(|w| w == "would_errno=EACCES"), "{line}");
        assert!(!line.contains(" errno="), "{line}");
        // A record of an older program says 0 in audit mode.
        let ev = event(ACTION_AUDITED, 0);
        let line = log_line(
            &ev,
            &mut names(),
            "host",
            (Errno::Eacces, false),
            &Fixed(1000),
        );
        assert!(line.split(' ').any(|w| w == "would_errno=EPERM"), "{line}");
    }

    #[test]
    fn a_unit_at_its_limit_is_named_with_its_share() {
        let mut ev = event(ACTION_DENIED, libc::EADDRINUSE as u32);
        ev.cgroup_id = 12;
        ev.reason = REASON_LIMIT;
        ev.unit_id = 9;
        ev.held = 2;
        ev.limit = 2;
        ev.uid = 64055;
        let line = log_line(&ev, &mut names(), "host", EADDRINUSE, &Fixed(1000));
        assert!(
            line.ends_with(" cgroup_id=12 netns=host errno=EADDRINUSE reason=limit unit=/machine.slice/vm1.scope held=2 limit=2 uid=64055"),
            "{line}"
        );
    }

    #[test]
    fn a_refusal_logged_late_keeps_its_time() {
        let ev = event(ACTION_DENIED, libc::EADDRINUSE as u32);
        // Logged 134 s after the bind.
        let line = log_line(&ev, &mut names(), "host", EADDRINUSE, &Fixed(1134));
        assert!(
            line.ends_with(" late=2m14s at=2026-12-03T09:18:36.000Z"),
            "{line}"
        );
        // Logged at once: no time of its own.
        assert!(!log_line(&ev, &mut names(), "host", EADDRINUSE, &Fixed(1000)).contains("late="));
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(short_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(short_duration(Duration::from_secs(3 * 3600 + 120)), "3h2m");
    }

    #[test]
    fn namespaces_are_named_by_cookie_only() {
        let mut n = NetnsNames::default();
        n.set([
            (99, 4026531833, "host".to_owned()),
            (7, 4026532000, "blue".to_owned()),
        ]);
        assert_eq!(n.name(99), "host");
        assert_eq!(n.name(7), "blue");
        // Not guarded (a thread's own netns): never the process's netns.
        assert_eq!(n.name(5), "cookie:5");
    }

    #[test]
    fn a_cgroup_or_comm_cannot_forge_fields() {
        let mut ev = event(ACTION_DENIED, libc::EADDRINUSE as u32);
        ev.comm = *b"x errno=EPERM\0\0\0";
        ev.cgroup_id = 11;
        let line = log_line(&ev, &mut names(), "host", EADDRINUSE, &Fixed(1000));
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
    fn a_user_summary_names_its_busiest_cgroups() {
        let last = Offender {
            last_ns: 1,
            last_cgroup: 12,
            uid: 65534,
            last_tgid: 77,
            last_port: 49160,
            last_protocol: PROTO_TCP as u8,
            last_family: 4,
            last_errno: libc::EADDRINUSE as u32,
            last_action: ACTION_DENIED,
            ..Offender::default()
        };
        let news = News {
            key: BUDGET_UID | 65534,
            n: 1200,
            last,
        };
        let cgroups = vec![(9, 600), (11, 300), (12, 200), (13, 100)];
        let line = summary_line(&news, Some(&cgroups), 5, &mut names(), EADDRINUSE);
        assert_eq!(
            line,
            "denials summarised: 1200 more denials by uid=65534 in the last 5 s from 4 cgroups: cgroup1=/machine.slice/vm1.scope n1=600 cgroup2=\"/x comm=libvirtd pid=1 errno=EPERM\" n2=300 cgroup3_id=12 n3=200 other_cgroups=1 (last: port=49160/tcp family=ipv4 pid=77 comm=\"\" cgroup_id=12 errno=EADDRINUSE)"
        );
    }

    #[test]
    fn decodes_records_of_every_layout() {
        let mut ev = event(ACTION_DENIED, 1);
        ev.unit_id = 5;
        // SAFETY: reading the bytes of a POD value.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const DenialEvent).cast::<u8>(),
                size_of::<DenialEvent>(),
            )
        };
        let back = decode(bytes).unwrap();
        assert_eq!(
            (
                back.tgid,
                back.port,
                comm(&back.comm),
                back.netns_cookie,
                back.unit_id
            ),
            (4242, 49152, "glusterfsd".into(), 99, 5)
        );
        // Records of older programs: no cookie, or no unit and time.
        let old = decode(&bytes[..DENIAL_EVENT_V1_LEN]).unwrap();
        assert_eq!((old.tgid, old.netns_cookie), (4242, 0));
        let v2 = decode(&bytes[..port_guard_common::DENIAL_EVENT_V2_LEN]).unwrap();
        assert_eq!((v2.netns_cookie, v2.unit_id, v2.time_ns), (99, 0, 0));
        assert!(decode(&bytes[..10]).is_none());
    }
}
