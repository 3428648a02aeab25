//! The pin step, and keeping the pins: the new links pinned over the old ones, what an older
//! guard left removed, an fd of every pin held for as long as the daemon runs, and a pin that
//! vanishes put back from it ([`check`]).

use std::{
    fs, io,
    os::fd::{AsFd as _, OwnedFd},
};

use log::warn;
use port_guard_common::{MAP_OFFENDERS_OLD, PINNED_MAPS};

use super::{error::GuardError, load::NewLink};
use crate::{
    error::{IoContext as _, IoError},
    pin::{PinDir, LINKS, POST_LINKS, RELEASE_LINKS},
    sys,
};

/// A pin and what it names: a link's fd, or a map's id (the daemon's own fds keep its maps
/// alive; one fd per map is enough, and under a low fd limit every fd counts).
pub(super) struct Held {
    name: String,
    what: Pinned,
}

enum Pinned {
    Link(OwnedFd),
    Map(u32),
}

/// The pin step: the new links pinned, the pins an older guard left removed, and every pin
/// held for as long as the daemon runs.
pub(super) fn install(
    pin: &PinDir,
    links: Vec<NewLink>,
    sentinel: bool,
) -> Result<Vec<Held>, GuardError> {
    pin_links(pin, links)?;
    remove_leftovers(pin, sentinel)?;
    hold(pin, sentinel)
}

/// Pins the new links, back to back: the only window in which a crash leaves one hook pinned
/// without the other is between these syscalls; `PinDir::recover` completes it at the next
/// start. Where old links are pinned, the new ones go under `_new` and are renamed over them:
/// the old link detaches only once the new one is in place.
fn pin_links(pin: &PinDir, links: Vec<NewLink>) -> Result<(), GuardError> {
    let mut staged = Vec::new();
    for NewLink {
        program,
        pin_name,
        link,
    } in links
    {
        let dst = pin.file(pin_name);
        let staging = pin.file(&format!("{pin_name}_new"));
        let at = if fs::symlink_metadata(&dst).is_ok() {
            staging.clone()
        } else {
            dst.clone()
        };
        let _ = fs::remove_file(&staging);
        let pinned = link.pin(&at).map_err(|e| GuardError::PinLink {
            program,
            source: Box::new(e),
        })?;
        staged.push((at, dst, pinned));
    }
    for (at, dst, pinned) in staged {
        if at != dst {
            fs::rename(&at, &dst).at("rename pin to", &dst)?;
        }
        drop(pinned);
    }
    Ok(())
}

/// Removes the pins an older guard left that this one does not use.
fn remove_leftovers(pin: &PinDir, sentinel: bool) -> Result<(), GuardError> {
    // The old guard's post_bind links, when this one refuses without the sentinel: its bind
    // programs, the only ones that rewrote, are gone with their pins.
    if !sentinel {
        remove_links(pin, &POST_LINKS)?;
    }
    // The event budget of older programs (by cgroup alone), whose programs are gone now.
    let old = pin.file(MAP_OFFENDERS_OLD);
    if fs::symlink_metadata(&old).is_ok() {
        fs::remove_file(&old).at("remove pin", &old)?;
    }
    Ok(())
}

/// What every pin names (the maps, and the links this guard attached), kept for as long as the
/// daemon runs.
fn hold(pin: &PinDir, sentinel: bool) -> Result<Vec<Held>, GuardError> {
    let links = LINKS
        .iter()
        .chain(&RELEASE_LINKS)
        .chain(POST_LINKS.iter().filter(|_| sentinel))
        .map(|(_, l)| (*l, true));
    let mut held = Vec::new();
    for (name, link) in PINNED_MAPS.iter().map(|m| (*m, false)).chain(links) {
        let path = pin.file(name);
        let fd = sys::obj_get(&path).at("open pin", &path)?;
        let what = if link {
            Pinned::Link(fd)
        } else {
            Pinned::Map(sys::obj_id(fd.as_fd()).at("read the id of", &path)?)
        };
        held.push(Held {
            name: name.to_owned(),
            what,
        });
    }
    Ok(held)
}

/// What `Guard::check_pins` found.
#[derive(Debug)]
pub enum PinCheck {
    /// Every pin is in place and both links are attached.
    Intact,
    /// Pins had vanished while the links were attached; they were pinned again.
    Repinned(Vec<String>),
    /// The links were detached and their pins removed: `port-guard unload`.
    Unloaded,
    /// A link was detached while its pin remains: only a restart attaches again.
    Detached(Vec<String>),
}

/// Whether the links of `held` are attached, from the daemon's own fds (positive evidence both
/// ways: an error reading one is an error).
fn detached_links(held: &[Held]) -> io::Result<Vec<String>> {
    let mut detached = Vec::new();
    for h in held {
        if let Pinned::Link(fd) = &h.what {
            if sys::link_state(fd.as_fd())?.cgroup_id == 0 {
                detached.push(h.name.clone());
            }
        }
    }
    Ok(detached)
}

/// Looks at the pins of `held`: puts back any that vanished while the links are attached.
pub(super) fn check(pin: &PinDir, held: &[Held]) -> Result<PinCheck, GuardError> {
    let mut missing = Vec::new();
    for h in held {
        let path = pin.file(&h.name);
        match fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(h),
            Err(e) => return Err(IoError::new("stat", path, e).into()),
        }
    }
    let detached = detached_links(held).at("read link info of", pin.path())?;
    if !detached.is_empty() {
        let links_gone = missing.iter().any(|h| matches!(h.what, Pinned::Link(_)));
        return Ok(if links_gone {
            PinCheck::Unloaded
        } else {
            PinCheck::Detached(detached)
        });
    }
    if missing.is_empty() {
        return Ok(PinCheck::Intact);
    }
    repin(pin, &missing).map(PinCheck::Repinned)
}

/// Pins `missing` again from what the daemon holds (the pin dir made again first, if it went
/// too); returns their names.
fn repin(pin: &PinDir, missing: &[&Held]) -> Result<Vec<String>, GuardError> {
    pin.recreate()?;
    let mut done = Vec::new();
    for h in missing {
        let path = pin.file(&h.name);
        match &h.what {
            Pinned::Link(fd) => sys::obj_pin(fd.as_fd(), &path),
            Pinned::Map(id) => sys::map_fd(*id).and_then(|fd| sys::obj_pin(fd.as_fd(), &path)),
        }
        .at("pin again", &path)?;
        done.push(h.name.clone());
    }
    Ok(done)
}

/// Detaches the links of `links` (and any staged `_new` of them) and removes their pins.
pub(super) fn remove_links(pin: &PinDir, links: &[(&str, &str)]) -> Result<(), GuardError> {
    for (_, link_name) in links {
        for name in [(*link_name).to_owned(), format!("{link_name}_new")] {
            let path = pin.file(&name);
            if fs::symlink_metadata(&path).is_err() {
                continue;
            }
            // Detach now, even if a running daemon still holds the link open.
            match sys::obj_get(&path).and_then(|fd| sys::link_detach(&fd)) {
                Ok(()) => {}
                Err(e) => warn!(
                    "detaching {}: {e}; removing its pin instead",
                    path.display()
                ),
            }
            fs::remove_file(&path).at("remove pin", &path)?;
        }
    }
    Ok(())
}
