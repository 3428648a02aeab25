//! `--reserve SPEC` and the config's `ports`: any input is a valid range or one error line
//! naming it; a valid one prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use port_guard::policy::{PortRange, ReserveSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match s.parse::<ReserveSpec>() {
        Ok(spec) => {
            assert!(spec.range.first >= 1 && spec.range.first <= spec.range.last);
            assert!(spec.protocols.0 != 0 && spec.protocols.0 <= 3);
            let again: ReserveSpec = spec.to_string().parse().expect("a spec reparses");
            assert_eq!(again, spec);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{msg}");
        }
    }
    if let Ok(r) = s.parse::<PortRange>() {
        assert_eq!(r.to_string().parse::<PortRange>().unwrap(), r);
    }
});
