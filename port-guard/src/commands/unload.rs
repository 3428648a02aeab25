use anyhow::Result;
use log::info;

use crate::{guard, pin::PinDir};

pub fn run(pin: &PinDir, forget_unreachable: bool) -> Result<()> {
    guard::unload_with(pin, forget_unreachable)?;
    info!("guard at {} detached and unpinned", pin.path().display());
    Ok(())
}
