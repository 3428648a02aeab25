use anyhow::Result;
use log::info;

use crate::{guard, pin::PinDir};

pub fn run(pin: &PinDir) -> Result<()> {
    guard::unload(pin)?;
    info!("guard at {} detached and unpinned", pin.path().display());
    Ok(())
}
