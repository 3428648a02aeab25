//! The per-child shares of the limited ranges: the limits the daemon writes (`PG_LIMITS`), the
//! sockets each unit holds as the programs count them (`PG_SHARES`, `PG_CHARGES`), and the binds
//! refused by reason (`PG_REASONS`), of which a unit at its limit is one.

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use port_guard_common::{
    Proto, ShareKey, Slot, MAP_CHARGES, MAP_LIMITS, MAP_REASONS, MAP_SHARES, MAX_RANGES, REASONS,
};

use super::{map_err, Maps, MapsError};

pub(super) struct ShareMaps {
    limits: Array<MapData, u32>,
    shares: HashMap<MapData, ShareKey, u64>,
    charges: HashMap<MapData, u64, ShareKey>,
    reasons: PerCpuArray<MapData, u64>,
}

impl ShareMaps {
    /// The four maps, or None when any is missing (pins of an older daemon).
    pub(super) fn build(
        optional: &mut impl FnMut(&'static str) -> Option<Map>,
    ) -> Result<Option<ShareMaps>, MapsError> {
        let (Some(limits), Some(shares), Some(charges), Some(reasons)) = (
            optional(MAP_LIMITS),
            optional(MAP_SHARES),
            optional(MAP_CHARGES),
            optional(MAP_REASONS),
        ) else {
            return Ok(None);
        };
        Ok(Some(ShareMaps {
            limits: limits.try_into().map_err(map_err(MAP_LIMITS))?,
            shares: shares.try_into().map_err(map_err(MAP_SHARES))?,
            charges: charges.try_into().map_err(map_err(MAP_CHARGES))?,
            reasons: reasons.try_into().map_err(map_err(MAP_REASONS))?,
        }))
    }
}

/// A unit's share of one range now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// The unit's cgroup id.
    pub unit: u64,
    pub slot: u32,
    /// Sockets it holds (charged: bound, or whose bind is under way or failed and is not closed).
    pub held: u64,
}

impl Maps {
    /// Whether these maps have the per-child shares (pins of an older daemon do not).
    pub fn has_shares(&self) -> bool {
        self.shares.is_some()
    }

    /// The per-child limit of each slot (0: none).
    pub fn limits(&self) -> Result<[u32; MAX_RANGES], MapsError> {
        let mut out = [0u32; MAX_RANGES];
        if let Some(m) = &self.shares {
            for (slot, v) in Slot::all().zip(out.iter_mut()) {
                *v = m
                    .limits
                    .get(&slot.index(), 0)
                    .map_err(map_err(MAP_LIMITS))?;
            }
        }
        Ok(out)
    }

    /// Every unit holding sockets now, by slot then unit (counts of 0 left out).
    pub fn shares(&self) -> Result<Vec<Share>, MapsError> {
        let Some(m) = &self.shares else {
            return Ok(Vec::new());
        };
        let mut out: Vec<Share> = m
            .shares
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, held)| *held != 0 && *held < u64::MAX / 2)
            .map(|(k, held)| Share {
                unit: k.unit,
                slot: k.slot,
                held,
            })
            .collect();
        out.sort_by_key(|s| (s.slot, std::cmp::Reverse(s.held), s.unit));
        Ok(out)
    }

    /// Refused (or audited) binds of range `slot` and protocol `proto`, by reason (`REASON_*`
    /// as index).
    pub fn reasons(&self, slot: u32, proto: Proto) -> Result<[u64; REASONS as usize], MapsError> {
        let mut out = [0u64; REASONS as usize];
        let (Some(m), Some(s)) = (&self.shares, Slot::new(slot)) else {
            return Ok(out);
        };
        for (reason, cell) in out.iter_mut().enumerate() {
            *cell = m
                .reasons
                .get(&s.reason_index(proto, reason as u8), 0)
                .map_err(map_err(MAP_REASONS))?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// Sets the limit of `slot`. A slot whose limit is turned off or that changes hands
    /// (`forget`) loses its counts: sockets bound before a limit is set again are not counted.
    pub(super) fn set_limit(
        &mut self,
        slot: Slot,
        limit: u32,
        forget: bool,
    ) -> Result<(), MapsError> {
        let Some(m) = &mut self.shares else {
            return Ok(());
        };
        if limit == 0 || forget {
            // Off first, so that no program charges the slot while its counts are dropped.
            m.limits
                .set(slot.index(), 0, 0)
                .map_err(map_err(MAP_LIMITS))?;
            let removed = m.forget_slot(slot)?;
            self.leases.uncount_charges(removed);
        }
        m.limits
            .set(slot.index(), limit, 0)
            .map_err(map_err(MAP_LIMITS))
    }

    /// Units whose cgroup is gone and that hold nothing: their entries go (no process can bind
    /// from a removed cgroup, so no program can be counting on them). Returns how many.
    pub fn prune_shares(&mut self, gone: impl Fn(u64) -> bool) -> Result<usize, MapsError> {
        let Some(m) = &mut self.shares else {
            return Ok(0);
        };
        let stale: Vec<ShareKey> = m
            .shares
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, held)| *held == 0 && gone(k.unit))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            match m.shares.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_SHARES)(e)),
            }
        }
        Ok(stale.len())
    }
}

impl ShareMaps {
    /// Drops the charges and counts of `slot`. Returns how many charges it removed itself (a
    /// program may remove one first, and takes its count back then).
    fn forget_slot(&mut self, slot: Slot) -> Result<u64, MapsError> {
        let charges: Vec<u64> = self
            .charges
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, k)| k.slot == slot.index())
            .map(|(c, _)| c)
            .collect();
        let mut removed = 0;
        for c in charges {
            match self.charges.remove(&c) {
                Ok(()) => removed += 1,
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_CHARGES)(e)),
            }
        }
        let keys: Vec<ShareKey> = self
            .shares
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.slot == slot.index())
            .collect();
        for k in keys {
            match self.shares.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_SHARES)(e)),
            }
        }
        Ok(removed)
    }
}

/// Sums by slot: (slot → units and their counts), for status.
pub fn by_slot(shares: &[Share]) -> BTreeMap<u32, Vec<(u64, u64)>> {
    let mut out: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for s in shares {
        out.entry(s.slot).or_default().push((s.unit, s.held));
    }
    out
}
