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
    GuardConfig, PortEntry, Proto, RangeDef, Slot, ABI_VERSION, COUNTER_ALLOWED, COUNTER_AUDITED,
    COUNTER_DENIED, FLAG_NETNS_SCOPED, FLAG_PROTECT_EPHEMERAL, FLAG_RETVAL, FLAG_SENTINEL,
    FLAG_SHARES, MAP_ALLOWED, MAP_CONFIG, MAP_COUNTERS, MAP_PORTS, MAP_RANGES, MAX_ALLOWED,
    MAX_CGROUP_LEVEL, MAX_RANGES, MODE_AUDIT, MODE_ENFORCE,
};

use super::{map_err, Maps, MapsError};
use crate::{
    cgroup::{Cgroup2, CgroupError},
    error::IoError,
    policy::{Mode, Policy, PolicyError, Reservation, ReserveSpec},
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
    ranges: BTreeMap<Slot, RangeDef>,
    limits: [u32; MAX_RANGES],
}

/// The slot each range of a new policy takes. Stable slots: a range that keeps its ports keeps
/// its slot (and its counters). The others take never-used slots first, then slots of ranges
/// that are going away.
struct SlotPlan {
    /// Per range, in policy order.
    slots: Vec<Slot>,
    /// The slots that keep their range.
    kept: Vec<Slot>,
    /// The ranges (first, last) whose counters start now: those in a slot that is not kept.
    fresh: Vec<(u16, u16)>,
}

impl SlotPlan {
    fn new(reserve: &[Reservation], old_ranges: &BTreeMap<Slot, RangeDef>) -> SlotPlan {
        let mut slots: Vec<Option<Slot>> = Vec::new();
        for res in reserve {
            let keep = old_ranges.iter().find(|(s, d)| {
                d.first == res.spec.range.first
                    && d.last == res.spec.range.last
                    && !slots.contains(&Some(**s))
            });
            slots.push(keep.map(|(s, _)| *s));
        }
        let fresh: Vec<(u16, u16)> = reserve
            .iter()
            .zip(&slots)
            .filter(|(_, s)| s.is_none())
            .map(|(res, _)| (res.spec.range.first, res.spec.range.last))
            .collect();
        let kept: Vec<Slot> = slots.iter().flatten().copied().collect();
        let mut free: Vec<Slot> = Slot::all()
            .filter(|s| !old_ranges.contains_key(s))
            .chain(old_ranges.keys().copied().filter(|s| !kept.contains(s)))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let slots: Vec<Slot> = slots
            .into_iter()
            .map(|s| {
                s.unwrap_or_else(|| {
                    free.pop()
                        .expect("at most MAX_RANGES ranges (checked by the policy)")
                })
            })
            .collect();
        SlotPlan { slots, kept, fresh }
    }
}

/// The allowed cgroups' range masks (bit of each slot they are allowed in) and the mask of their
/// levels.
fn allowed_masks(r: &Resolved, slots: &[Slot]) -> Result<(StdHashMap<u64, u64>, u64), MapsError> {
    let mut masks: StdHashMap<u64, u64> = StdHashMap::new();
    let mut levels = 0u64;
    for (ids, slot) in r.allowed.iter().zip(slots) {
        for &(id, level) in ids.iter().filter(|(id, _)| *id != 0) {
            *masks.entry(id).or_default() |= slot.bit();
            levels |= 1u64 << level;
        }
    }
    if masks.len() > MAX_ALLOWED as usize {
        return Err(PolicyError::TooManyAllowed {
            count: masks.len(),
            max: MAX_ALLOWED,
        }
        .into());
    }
    Ok((masks, levels))
}

/// The config entry of `r`, its levels widened with `old`'s for the transition; the flags of
/// the daemon's own (ephemeral protection, the netns scope) kept from `old`.
fn policy_config(r: &Resolved, features: Features, old: GuardConfig, levels: u64) -> GuardConfig {
    let shares = r.policy.reserve.iter().any(|res| res.per_child_limit != 0);
    GuardConfig {
        abi: ABI_VERSION,
        mode: match r.policy.mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Audit => MODE_AUDIT,
        },
        errno: r.policy.errno.raw(),
        flags: (old.flags & (FLAG_PROTECT_EPHEMERAL | FLAG_NETNS_SCOPED))
            | if features.set_retval { FLAG_RETVAL } else { 0 }
            | if features.uses_sentinel(&r.policy) {
                FLAG_SENTINEL
            } else {
                0
            }
            | if shares { FLAG_SHARES } else { 0 },
        allowed_levels: levels | old.allowed_levels,
        attach_cgroup_id: r.attach_id,
        spawn_parent_id: r.spawn_parent_id,
    }
}

/// The [`MAP_RANGES`] value of a configured range.
fn range_def(spec: &ReserveSpec) -> RangeDef {
    RangeDef {
        first: spec.range.first,
        last: spec.range.last,
        protocols: spec.protocols.0,
        in_use: 1,
    }
}

impl Maps {
    /// Ranges by slot as the map holds them.
    fn range_defs(&self) -> BTreeMap<Slot, RangeDef> {
        self.ranges()
            .into_iter()
            .filter_map(|r| Some((Slot::new(r.slot)?, range_def(&r.spec))))
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

    /// The write's steps: plan the slots; the allowed cgroups (old bits kept) and then the
    /// config, so that a mode or errno change takes effect only once the cgroups it covers are
    /// in; the new ranges and their ports; the old ranges' ports and slots cleared; the allowed
    /// cgroups and levels trimmed to the new policy.
    fn write_policy_inner(
        &mut self,
        r: &Resolved,
        features: Features,
        before: &Snapshot,
    ) -> Result<Vec<(u16, u16)>, MapsError> {
        let plan = SlotPlan::new(&r.policy.reserve, &before.ranges);
        let (allowed, levels) = allowed_masks(r, &plan.slots)?;
        let mut config = policy_config(r, features, before.config, levels);
        self.widen_allowed(&allowed, &before.allowed)?;
        self.config.set(0, config, 0).map_err(map_err(MAP_CONFIG))?;
        let reserved = self.write_ranges(r, &plan, before)?;
        self.clear_old_ranges(&before.ranges, &reserved, &plan)?;
        self.narrow_allowed(&allowed, &before.allowed)?;
        config.allowed_levels = levels;
        self.config.set(0, config, 0).map_err(map_err(MAP_CONFIG))?;
        Ok(plan.fresh)
    }

    /// Gives every cgroup of `new` its mask, with the bits it has in `old` too, for the
    /// transition.
    fn widen_allowed(
        &mut self,
        new: &StdHashMap<u64, u64>,
        old: &StdHashMap<u64, u64>,
    ) -> Result<(), MapsError> {
        for (&id, &mask) in new {
            let old = old.get(&id).copied().unwrap_or(0);
            self.allowed
                .insert(id, mask | old, 0)
                .map_err(map_err(MAP_ALLOWED))?;
        }
        Ok(())
    }

    /// Removes the cgroups of `old` that `new` does not have, and gives those of `new` their
    /// exact masks.
    fn narrow_allowed(
        &mut self,
        new: &StdHashMap<u64, u64>,
        old: &StdHashMap<u64, u64>,
    ) -> Result<(), MapsError> {
        for id in old.keys().filter(|id| !new.contains_key(id)) {
            self.allowed.remove(id).map_err(map_err(MAP_ALLOWED))?;
        }
        for (&id, &mask) in new {
            self.allowed
                .insert(id, mask, 0)
                .map_err(map_err(MAP_ALLOWED))?;
        }
        Ok(())
    }

    /// Writes the ranges of `r` in their slots with their limits and ports; returns which ports
    /// they reserve.
    fn write_ranges(
        &mut self,
        r: &Resolved,
        plan: &SlotPlan,
        before: &Snapshot,
    ) -> Result<Vec<bool>, MapsError> {
        let mut reserved = vec![false; 65536];
        for (res, &slot) in r.policy.reserve.iter().zip(&plan.slots) {
            // A slot that held another range starts its shares afresh; one that keeps its range
            // keeps them (a changed limit applies to the next bind).
            let forget = !plan.kept.contains(&slot) && before.limits[slot.index() as usize] != 0;
            self.set_limit(slot, res.per_child_limit, forget)?;
            self.put_range(slot, range_def(&res.spec), &mut reserved)?;
        }
        Ok(reserved)
    }

    /// Clears the ports of `old_ranges` that no range reserves now, the slots no range uses now,
    /// and the counters of every slot that changed hands.
    fn clear_old_ranges(
        &mut self,
        old_ranges: &BTreeMap<Slot, RangeDef>,
        reserved: &[bool],
        plan: &SlotPlan,
    ) -> Result<(), MapsError> {
        for (&slot, def) in old_ranges {
            self.clear_ports(def, reserved)?;
            if !plan.kept.contains(&slot) {
                if !plan.slots.contains(&slot) {
                    self.ranges
                        .set(slot.index(), RangeDef::default(), 0)
                        .map_err(map_err(MAP_RANGES))?;
                    self.set_limit(slot, 0, true)?;
                }
                // The slot's counters were the old range's.
                self.reset_counters(slot)?;
            }
        }
        Ok(())
    }

    /// Puts `def` in `slot`: the range, then its ports (marked in `reserved`).
    fn put_range(
        &mut self,
        slot: Slot,
        def: RangeDef,
        reserved: &mut [bool],
    ) -> Result<(), MapsError> {
        self.ranges
            .set(slot.index(), def, 0)
            .map_err(map_err(MAP_RANGES))?;
        let entry = PortEntry {
            slot: slot.entry(),
            protocols: def.protocols,
        };
        for port in def.first..=def.last {
            reserved[port as usize] = true;
            self.ports
                .set(u32::from(port), entry, 0)
                .map_err(map_err(MAP_PORTS))?;
        }
        Ok(())
    }

    /// Clears the ports of `def` that are not `reserved`.
    fn clear_ports(&mut self, def: &RangeDef, reserved: &[bool]) -> Result<(), MapsError> {
        for port in def.first..=def.last {
            if !reserved[port as usize] {
                self.ports
                    .set(u32::from(port), PortEntry::default(), 0)
                    .map_err(map_err(MAP_PORTS))?;
            }
        }
        Ok(())
    }

    /// Puts the policy maps back as `s` recorded them, in the same gap-free order: the old
    /// allowed cgroups (with what is there now) and levels first, then ports and ranges, then
    /// the exact old entries. Counters a failed write reset stay reset.
    fn restore(&mut self, s: &Snapshot) -> Result<(), MapsError> {
        let now_allowed = self.allowed()?;
        let now_config = self.raw_config()?;
        let mut widened = s.config;
        widened.allowed_levels |= now_config.allowed_levels;
        // May fail for a full map only if the entry is new: old entries were never removed
        // before the failure (removals come last).
        self.widen_allowed(&s.allowed, &now_allowed)?;
        self.config
            .set(0, widened, 0)
            .map_err(map_err(MAP_CONFIG))?;
        let now_ranges = self.range_defs();
        let mut reserved = vec![false; 65536];
        for (&slot, def) in &s.ranges {
            self.put_range(slot, *def, &mut reserved)?;
        }
        for (&slot, def) in &now_ranges {
            self.clear_ports(def, &reserved)?;
            if !s.ranges.contains_key(&slot) {
                self.ranges
                    .set(slot.index(), RangeDef::default(), 0)
                    .map_err(map_err(MAP_RANGES))?;
            }
        }
        for (slot, &limit) in Slot::all().zip(&s.limits) {
            self.set_limit(slot, limit, false)?;
        }
        self.narrow_allowed(&s.allowed, &now_allowed)?;
        self.config.set(0, s.config, 0).map_err(map_err(MAP_CONFIG))
    }

    fn reset_counters(&mut self, slot: Slot) -> Result<(), MapsError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
            IoError::new(
                "read possible cpus",
                Path::new("/sys/devices/system/cpu/possible"),
                e,
            )
        })?;
        for proto in Proto::ALL {
            for kind in [COUNTER_ALLOWED, COUNTER_DENIED, COUNTER_AUDITED] {
                let zero = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                    .map_err(|e| IoError::new("build counters", Path::new(MAP_COUNTERS), e))?;
                self.counters
                    .set(slot.counter(proto, kind), zero, 0)
                    .map_err(map_err(MAP_COUNTERS))?;
            }
        }
        Ok(())
    }
}
