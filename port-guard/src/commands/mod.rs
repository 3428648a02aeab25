//! One file per verb: each parses nothing and decides little, calling the library.

pub mod check;
pub mod daemon;
pub mod lease;
pub mod reload;
pub mod spawn;
pub mod status;
pub mod unload;
