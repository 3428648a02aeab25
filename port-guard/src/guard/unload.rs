//! Unloading: the links detached, every pin and the pin dir removed, and what the agent kept
//! beside them of a guard that is gone.

use std::fs;

use log::{info, warn};

use super::{error::GuardError, pins::remove_links};
use crate::{
    error::IoContext as _,
    pin::{PinDir, LINKS, POST_LINKS, RELEASE_LINKS},
};

/// Detaches the links and removes every pin and the pin dir.
pub fn unload(pin: &PinDir) -> Result<(), GuardError> {
    unload_with(pin, false)
}

/// [`unload`], forgetting (with `forget_unreachable`) the sysctl changes of network namespaces
/// nothing reaches any more.
pub fn unload_with(pin: &PinDir, forget_unreachable: bool) -> Result<(), GuardError> {
    pin.verify()?;
    // First, so that a failure (another network namespace) leaves the guard whole.
    for line in crate::ephemeral::restore(pin.path(), forget_unreachable)? {
        info!("{line}");
    }
    // The bind programs first: the post_bind ones must outlive every rewrite, and the release
    // one every charge.
    remove_links(pin, &LINKS)?;
    remove_links(pin, &POST_LINKS)?;
    remove_links(pin, &RELEASE_LINKS)?;
    let entries = fs::read_dir(pin.path()).at("read pin dir", pin.path())?;
    for entry in entries {
        let path = entry.at("read pin dir", pin.path())?.path();
        fs::remove_file(&path).at("remove pin", &path)?;
    }
    fs::remove_dir(pin.path()).at("remove pin dir", pin.path())?;
    // What the daemon recorded of the guarded namespaces for spawn and check, when the
    // counters started (they went with the maps), and the daemon's record and counts: nothing
    // of a guard that is gone is left to describe it.
    for what in ["netns", "counters", "daemon", "stats"] {
        let record = crate::state::path(pin.path(), what);
        if let Err(e) = crate::state::remove(&record) {
            warn!("{e}");
        }
    }
    Ok(())
}
