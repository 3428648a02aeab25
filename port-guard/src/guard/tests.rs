//! The embedded object held against the agent's list of its maps.

use std::collections::BTreeSet;

use aya_obj::{maps::PinningType, Object};
use port_guard_common::{MAP_NETNS_LEARN, PINNED_MAPS};

use super::load::OBJECT;

/// The maps of the object that are not pinned, each with why. `PINNED_MAPS` and these are all
/// the maps aya creates from the object.
const NOT_PINNED: [(&str, &str); 4] = [
    // The agent's scratch map for learning a netns cookie: written by the helper program of
    // one daemon, read back by it at once, never meant to outlive it.
    (MAP_NETNS_LEARN, "the netns-learning helper's answer"),
    // aya-log's ring buffer of the programs' log records (`AYA_LOGS` in aya-log-ebpf): read by
    // the daemon that loaded the programs, made afresh by each load.
    ("AYA_LOGS", "the programs' aya-log records"),
    // The read-only globals, a map aya makes of the section and the loader fills in before the
    // programs are loaded: USE_RETVAL, USE_NETNS and SENTINEL_PORT (the GLOBAL_* names of
    // port-guard-common), aya-log's AYA_LOG_LEVEL, and the log records' constant strings.
    (".rodata", "the load-time constants"),
    // An 8-byte constant (a zero) that LLVM puts in a mergeable section of its own; a change
    // of toolchain may add or drop sections of this kind.
    (".rodata.cst8", "a constant of the compiler's"),
];

#[test]
fn the_object_pins_exactly_the_pinned_maps() {
    let object = Object::parse(OBJECT).expect("the embedded object parses");
    let pinned: BTreeSet<&str> = object
        .maps
        .iter()
        .filter(|(_, m)| matches!(m.pinning(), PinningType::ByName))
        .map(|(name, _)| name.as_str())
        .collect();
    // Every pin the agent opens, holds, checks and removes is one the programs make, and no
    // other.
    assert_eq!(pinned, PINNED_MAPS.into_iter().collect::<BTreeSet<_>>());
    let all: BTreeSet<&str> = object.maps.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = PINNED_MAPS
        .into_iter()
        .chain(NOT_PINNED.map(|(name, _)| name))
        .collect();
    assert_eq!(
        all, expected,
        "a map not pinned must be listed in NOT_PINNED, with why"
    );
}
