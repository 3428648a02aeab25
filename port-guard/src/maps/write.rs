//! Writing a policy into the maps while the programs run, all or nothing.
//!
//! The order never opens a gap: allowed cgroups before the ports they cover, stale ports cleared
//! before stale allowed cgroups, and the level mask widened for the transition. When a write
//! fails part-way (a map full), the maps are put back as they were before it started, so "the
//! old config stays" is true of the kernel and not only of the daemon's memory.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    path::Path,
};

use log::error;
use port_guard_common::{
    counter_index, GuardConfig, PortEntry, RangeDef, ABI_VERSION, COUNTER_ALLOWED, COUNTER_AUDITED,
    COUNTER_DENIED, FLAG_NETNS_SCOPED, FLAG_PROTECT_EPHEMERAL, FLAG_RETVAL, FLAG_SENTINEL,
    FLAG_SHARES, MAP_ALLOWED, MAP_CONFIG, MAP_COUNTERS, MAP_PORTS, MAP_RANGES, MAX_ALLOWED,
    MAX_CGROUP_LEVEL, MAX_RANGES, MODE_AUDIT, MODE_ENFORCE,
};

use super::{map_err, Maps, MapsError};
use crate::{
    cgroup::{Cgroup2, CgroupError},
    error::IoError,
    policy::{Mode, Policy, PolicyError},
    probe::Features,
};

/// A policy with every cgroup resolved to its id.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub policy: Policy,
    pub attach_id: u64,
    pub spawn_parent_id: u64,
    /// Per range (in policy order): the allowed cgroups' ids and levels.
    pub allowed: Vec<Vec<(u64, u32)>>,
}

impl Resolved {
    /// Resolves every cgroup of `policy`. The attach cgroup must exist; an allowed cgroup that
    /// does not exist yet gets id 0 (nothing in the map) until it appears.
    pub fn new(
        policy: Policy,
        cg: &Cgroup2,
        spawn_parent_id: u64,
    ) -> Result<Resolved, CgroupError> {
        let attach_id = cg.id(&policy.attach)?;
        let mut allowed = Vec::new();
        for r in &policy.reserve {
            let mut ids = Vec::new();
            for a in &r.allow {
                if a.level() > MAX_CGROUP_LEVEL {
                    return Err(CgroupError::TooDeep(a.clone()));
                }
                let id = match cg.id(a) {
                    Ok(id) => id,
                    Err(CgroupError::Missing { .. }) => 0,
                    Err(e) => return Err(e),
                };
                ids.push((id, a.level()));
            }
            allowed.push(ids);
        }
        Ok(Resolved {
            policy,
            attach_id,
            spawn_parent_id,
            allowed,
        })
    }
}

/// What the policy maps held before a write: enough to put them back.
struct Snapshot {
    config: GuardConfig,
    allowed: StdHashMap<u64, u64>,
    ranges: BTreeMap<u32, RangeDef>,
    limits: [u32; MAX_RANGES],
}

impl Maps {
    /// Ranges by slot as the map holds them.
    fn range_defs(&self) -> BTreeMap<u32, RangeDef> {
        self.ranges()
            .into_iter()
            .map(|r| {
                (
                    r.slot,
                    RangeDef {
                        first: r.spec.range.first,
                        last: r.spec.range.last,
                        protocols: r.spec.protocols.0,
                        in_use: 1,
                    },
                )
            })
            .collect()
    }

    fn snapshot(&self) -> Result<Snapshot, MapsError> {
        Ok(Snapshot {
            config: self.raw_config()?,
            allowed: self.allowed()?,
            ranges: self.range_defs(),
            limits: self.limits()?,
        })
    }

    /// Writes `r` into the maps; if any write fails, restores what they held before and returns
    /// the error. Returns the ranges (first, last) whose counters start now: those that did not
    /// keep the slot of a range with the same ports.
    pub fn write_policy(
        &mut self,
        r: &Resolved,
        features: Features,
    ) -> Result<Vec<(u16, u16)>, MapsError> {
        let before = self.snapshot()?;
        let result = self.write_policy_inner(r, features, &before);
        if let Err(e) = &result {
            if let Err(restore) = self.restore(&before) {
                error!("writing the policy failed ({e}) and so did restoring the previous one ({restore}): the guard's maps hold part of each; reload again or restart the daemon");
            }
        }
        result
    }

    fn write_policy_inner(
        &mut self,
        r: &Resolved,
        features: Features,
        before: &Snapshot,
    ) -> Result<Vec<(u16, u16)>, MapsError> {
        let old_ranges = &before.ranges;
        let old_allowed = &before.allowed;
        let old_config = before.config;

        // Stable slots: a range that keeps its ports keeps its slot (and its counters). The
        // others take never-used slots first, then slots of ranges that are going away.
        let mut slots: Vec<Option<u32>> = Vec::new();
        for res in &r.policy.reserve {
            let keep = old_ranges.iter().find(|(s, d)| {
                d.first == res.spec.range.first
                    && d.last == res.spec.range.last
                    && !slots.contains(&Some(**s))
            });
            slots.push(keep.map(|(s, _)| *s));
        }
        let fresh: Vec<(u16, u16)> = r
            .policy
            .reserve
            .iter()
            .zip(&slots)
            .filter(|(_, s)| s.is_none())
            .map(|(res, _)| (res.spec.range.first, res.spec.range.last))
            .collect();
        let kept: Vec<u32> = slots.iter().flatten().copied().collect();
        let mut free: Vec<u32> = (0..MAX_RANGES as u32)
            .filter(|s| !old_ranges.contains_key(s))
            .chain(old_ranges.keys().copied().filter(|s| !kept.contains(s)))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let slots: Vec<u32> = slots
            .into_iter()
            .map(|s| {
                s.unwrap_or_else(|| {
                    free.pop()
                        .expect("at most MAX_RANGES ranges (checked by the policy)")
                })
            })
            .collect();
        let mut new_allowed: StdHashMap<u64, u64> = StdHashMap::new();
        let mut levels = 0u64;
        for (i, ids) in r.allowed.iter().enumerate() {
            for &(id, level) in ids.iter().filter(|(id, _)| *id != 0) {
                *new_allowed.entry(id).or_default() |= 1u64 << slots[i];
                levels |= 1u64 << level;
            }
        }
        if new_allowed.len() > MAX_ALLOWED as usize {
            return Err(PolicyError::TooManyAllowed {
                count: new_allowed.len(),
                max: MAX_ALLOWED,
            }
            .into());
        }

        let shares = r.policy.reserve.iter().any(|res| res.per_child_limit != 0);
        let mut config = GuardConfig {
            abi: ABI_VERSION,
            mode: match r.policy.mode {
                Mode::Enforce => MODE_ENFORCE,
                Mode::Audit => MODE_AUDIT,
            },
            errno: r.policy.errno.raw(),
            flags: (old_config.flags & (FLAG_PROTECT_EPHEMERAL | FLAG_NETNS_SCOPED))
                | if features.set_retval { FLAG_RETVAL } else { 0 }
                | if features.uses_sentinel(&r.policy) {
                    FLAG_SENTINEL
                } else {
                    0
                }
                | if shares { FLAG_SHARES } else { 0 },
            allowed_levels: levels | old_config.allowed_levels,
            attach_cgroup_id: r.attach_id,
            spawn_parent_id: r.spawn_parent_id,
        };
        // Allowed cgroups first (old bits kept for the transition; trimmed below), then the
        // config: a mode or errno change takes effect only once the cgroups it covers are in.
        for (&id, &mask) in &new_allowed {
            let old = old_allowed.get(&id).copied().unwrap_or(0);
            self.allowed
                .insert(id, mask | old, 0)
                .map_err(map_err(MAP_ALLOWED))?;
        }
        self.config.set(0, config, 0).map_err(map_err(MAP_CONFIG))?;

        let mut reserved = vec![false; 65536];
        for (i, res) in r.policy.reserve.iter().enumerate() {
            let slot = slots[i];
            // A slot that held another range starts its shares afresh; one that keeps its range
            // keeps them (a changed limit applies to the next bind).
            let forget = !kept.contains(&slot) && before.limits[slot as usize] != 0;
            self.set_limit(slot, res.per_child_limit, forget)?;
            let def = RangeDef {
                first: res.spec.range.first,
                last: res.spec.range.last,
                protocols: res.spec.protocols.0,
                in_use: 1,
            };
            self.ranges.set(slot, def, 0).map_err(map_err(MAP_RANGES))?;
            let entry = PortEntry {
                slot: slot as u16 + 1,
                protocols: res.spec.protocols.0,
            };
            for port in res.spec.range.ports() {
                reserved[port as usize] = true;
                self.ports
                    .set(u32::from(port), entry, 0)
                    .map_err(map_err(MAP_PORTS))?;
            }
        }
        for (&slot, def) in old_ranges {
            for port in def.first..=def.last {
                if !reserved[port as usize] {
                    self.ports
                        .set(u32::from(port), PortEntry::default(), 0)
                        .map_err(map_err(MAP_PORTS))?;
                }
            }
            if !kept.contains(&slot) {
                if !slots.contains(&slot) {
                    self.ranges
                        .set(slot, RangeDef::default(), 0)
                        .map_err(map_err(MAP_RANGES))?;
                    self.set_limit(slot, 0, true)?;
                }
                // The slot's counters were the old range's.
                self.reset_counters(slot)?;
            }
        }

        for &id in old_allowed.keys() {
            match new_allowed.get(&id) {
                Some(&mask) => self.allowed.insert(id, mask, 0),
                None => self.allowed.remove(&id),
            }
            .map_err(map_err(MAP_ALLOWED))?;
        }
        for (&id, &mask) in &new_allowed {
            self.allowed
                .insert(id, mask, 0)
                .map_err(map_err(MAP_ALLOWED))?;
        }
        config.allowed_levels = levels;
        self.config.set(0, config, 0).map_err(map_err(MAP_CONFIG))?;
        Ok(fresh)
    }

    /// Puts the policy maps back as `s` recorded them, in the same gap-free order: the old
    /// allowed cgroups (with what is there now) and levels first, then ports and ranges, then
    /// the exact old entries. Counters a failed write reset stay reset.
    fn restore(&mut self, s: &Snapshot) -> Result<(), MapsError> {
        let now_allowed = self.allowed()?;
        let now_config = self.raw_config()?;
        let mut widened = s.config;
        widened.allowed_levels |= now_config.allowed_levels;
        for (&id, &mask) in &s.allowed {
            let extra = now_allowed.get(&id).copied().unwrap_or(0);
            // May fail for a full map only if the entry is new: old entries were never removed
            // before the failure (removals come last).
            self.allowed
                .insert(id, mask | extra, 0)
                .map_err(map_err(MAP_ALLOWED))?;
        }
        self.config
            .set(0, widened, 0)
            .map_err(map_err(MAP_CONFIG))?;
        let now_ranges = self.range_defs();
        let mut reserved = vec![false; 65536];
        for (&slot, def) in &s.ranges {
            self.ranges
                .set(slot, *def, 0)
                .map_err(map_err(MAP_RANGES))?;
            let entry = PortEntry {
                slot: slot as u16 + 1,
                protocols: def.protocols,
            };
            for port in def.first..=def.last {
                reserved[port as usize] = true;
                self.ports
                    .set(u32::from(port), entry, 0)
                    .map_err(map_err(MAP_PORTS))?;
            }
        }
        for (&slot, def) in &now_ranges {
            for port in def.first..=def.last {
                if !reserved[port as usize] {
                    self.ports
                        .set(u32::from(port), PortEntry::default(), 0)
                        .map_err(map_err(MAP_PORTS))?;
                }
            }
            if !s.ranges.contains_key(&slot) {
                self.ranges
                    .set(slot, RangeDef::default(), 0)
                    .map_err(map_err(MAP_RANGES))?;
            }
        }
        for (slot, &limit) in s.limits.iter().enumerate() {
            self.set_limit(slot as u32, limit, false)?;
        }
        for (&id, _) in now_allowed
            .iter()
            .filter(|(id, _)| !s.allowed.contains_key(id))
        {
            self.allowed.remove(&id).map_err(map_err(MAP_ALLOWED))?;
        }
        for (&id, &mask) in &s.allowed {
            self.allowed
                .insert(id, mask, 0)
                .map_err(map_err(MAP_ALLOWED))?;
        }
        self.config.set(0, s.config, 0).map_err(map_err(MAP_CONFIG))
    }

    fn reset_counters(&mut self, slot: u32) -> Result<(), MapsError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
            IoError::new(
                "read possible cpus",
                Path::new("/sys/devices/system/cpu/possible"),
                e,
            )
        })?;
        for proto in 0..2 {
            for kind in [COUNTER_ALLOWED, COUNTER_DENIED, COUNTER_AUDITED] {
                let zero = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                    .map_err(|e| IoError::new("build counters", Path::new(MAP_COUNTERS), e))?;
                self.counters
                    .set(counter_index(slot, proto, kind), zero, 0)
                    .map_err(map_err(MAP_COUNTERS))?;
            }
        }
        Ok(())
    }
}
