//! Cgroup paths: anything with `..`, `.`, empty components, NUL, over-long components is refused
//! with a message; an accepted path is normalised and never escapes the cgroup2 mount.
#![no_main]

use libfuzzer_sys::fuzz_target;
use port_guard::cgroup::{Cgroup2, CgroupPath};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match s.parse::<CgroupPath>() {
        Ok(p) => {
            for c in p.components() {
                assert!(!c.is_empty() && c != "." && c != ".." && !c.contains('\0') && c.len() <= 255);
            }
            let dir = Cgroup2::at("/sys/fs/cgroup".into()).dir(&p);
            assert!(dir.starts_with("/sys/fs/cgroup"));
            assert_eq!(p.to_string().parse::<CgroupPath>().unwrap(), p);
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
    }
});
