//! Loading, adopting, keeping and unloading the guard. The kernel is the state store: the maps
//! and the two cgroup links are pinned under the pin dir ([`crate::pin`]), and everything here
//! works from them.
//!
//! Load and adopt are one path. The object is loaded with its maps pinned by name, so a pinned
//! map (leases included) is reused rather than created. The policy is written into the maps, then
//! new bind4/bind6 links are attached next to any old ones (multi-attach), pinned under a
//! temporary name and renamed over the old pins: the old link goes away only once the new one
//! enforces, so a restart never leaves an unguarded instant, and a new binary replaces the old
//! programs in place.
//!
//! The daemon keeps an fd of every pin it made or adopted ([`Guard::check_pins`]): a pin that
//! vanishes while the links are still attached is put back from it; links that were detached
//! (`port-guard unload`) end the daemon.
//!
//! Here is [`Guard`] and the order of its steps; each step is a module: `load` (the object,
//! then its programs attached), `pins` (pinning and keeping the pins), `unload`, and `learn`
//! (a network namespace's cookie).

mod error;
mod learn;
mod load;
mod pins;
mod unload;

use aya::Ebpf;
use log::{info, warn};
use port_guard_common::ABI_VERSION;
pub use port_guard_common::PINNED_MAPS;

pub use self::{
    error::GuardError,
    pins::PinCheck,
    unload::{unload, unload_with},
};
use crate::{
    cgroup::{Cgroup2, CgroupPath},
    leases::migrate::Migration,
    maps::{Maps, MapsError, Resolved},
    netns::Netns,
    pin::PinDir,
    probe::Features,
};

/// A loaded guard: the object (its programs and the event ring buffer) and the maps.
pub struct Guard {
    pub ebpf: Ebpf,
    pub maps: Maps,
    /// Whether pins of an earlier guard were found and taken over.
    pub adopted: bool,
    /// The ranges whose counters started with this load (see [`Maps::write_policy`]).
    pub fresh_counters: Vec<(u16, u16)>,
    held: Vec<pins::Held>,
}

impl Guard {
    /// Loads the object with its maps pinned (reused when already pinned), writes the policy,
    /// runs `before_attach` (which writes the guarded network namespaces: it needs the loaded
    /// object to learn their cookies) and attaches. On a first load, any failure removes
    /// everything this call created.
    pub fn start(
        pin: &PinDir,
        r: &Resolved,
        features: Features,
        cg: &Cgroup2,
        before_attach: impl FnOnce(&mut Guard) -> Result<(), GuardError>,
    ) -> Result<Guard, GuardError> {
        let adopted = pin.exists();
        let mut migration = if adopted { adoptable(pin)? } else { None };
        let result = Guard::start_inner(
            pin,
            r,
            features,
            cg,
            adopted,
            migration.as_mut(),
            before_attach,
        );
        if let Some(m) = migration {
            end_migration(pin, m, result.is_ok());
        }
        if result.is_err() && !adopted {
            if let Err(e) = unload(pin) {
                warn!("cleaning up after a failed start: {e}");
            }
        }
        result
    }

    /// The start's steps: load the object, take its maps (moving the leases of a migration
    /// over first), write the policy, then `before_attach`, attach, and pin.
    fn start_inner(
        pin: &PinDir,
        r: &Resolved,
        features: Features,
        cg: &Cgroup2,
        adopted: bool,
        migration: Option<&mut Migration>,
        before_attach: impl FnOnce(&mut Guard) -> Result<(), GuardError>,
    ) -> Result<Guard, GuardError> {
        let sentinel = features.uses_sentinel(&r.policy);
        let mut ebpf = load::object(pin, features, sentinel.then_some(r.policy.sentinel_port))?;
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        if let Some(m) = migration {
            // Before the config says the new layout, and before the new programs attach.
            m.copy(maps.leases_mut()).map_err(MapsError::from)?;
        }
        let fresh_counters = maps.write_policy(r, features)?;
        let mut g = Guard {
            ebpf,
            maps,
            adopted,
            fresh_counters,
            held: Vec::new(),
        };
        before_attach(&mut g)?;
        let links = load::attach(&mut g.ebpf, &cg.dir(&r.policy.attach), sentinel)?;
        g.held = pins::install(pin, links, sentinel)?;
        Ok(g)
    }

    /// Looks at the pins: puts back any that vanished while the links are attached.
    pub fn check_pins(&self, pin: &PinDir) -> Result<PinCheck, GuardError> {
        pins::check(pin, &self.held)
    }

    /// The cookie the kernel gives the network namespace `ns` (what the programs compare with
    /// the guarded set), learnt by the object's helper program.
    pub fn cookie_of(
        &mut self,
        cg: &Cgroup2,
        scratch: &CgroupPath,
        ns: &Netns,
    ) -> Result<u64, GuardError> {
        learn::cookie_of(&mut self.ebpf, cg, scratch, ns)
    }
}

/// Whether the pins of an earlier guard can be taken over: a foreign layout is refused before
/// aya reuses its maps; layout 2 is migrated (the migration, prepared).
fn adoptable(pin: &PinDir) -> Result<Option<Migration>, GuardError> {
    match Maps::open(pin) {
        Ok(_) => {
            crate::leases::migrate::remove_leftover(pin);
            Ok(None)
        }
        Err(MapsError::Abi { found: 2, .. }) => {
            info!("the guard pinned at {} uses map layout 2: its leases move to layout {ABI_VERSION} in place while it keeps enforcing", pin.path().display());
            Ok(Some(Migration::prepare(pin)?))
        }
        Err(e) => Err(e.into()),
    }
}

/// Finishes the lease migration once the new links replaced the old ones (`started`): the late
/// writes, then the old map goes. Undoes it otherwise.
fn end_migration(pin: &PinDir, m: Migration, started: bool) {
    if !started {
        m.abort();
        return;
    }
    match Maps::open(pin) {
        Ok(mut maps) => m.finish(maps.leases_mut()),
        Err(e) => warn!(
            "finishing the lease migration: {e}; {} stays pinned until the next start",
            crate::leases::migrate::ASIDE
        ),
    }
}

#[cfg(test)]
mod tests;
