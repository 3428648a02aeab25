//! The TOML config file: any input is a policy that satisfies the kernel maps' limits, or one
//! error line; never a panic, never a truncated policy.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use port_guard::config::{build_policy, ConfigFile, Overrides};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/fuzz.toml");
    let result = ConfigFile::parse(path, text).and_then(|f| build_policy(&f, Some(path), &Overrides::default()));
    match result {
        Ok(p) => {
            assert!(!p.reserve.is_empty() && p.reserve.len() <= 64);
            for (i, a) in p.reserve.iter().enumerate() {
                for b in &p.reserve[i + 1..] {
                    assert!(!a.spec.range.overlaps(&b.spec.range));
                }
            }
        }
        Err(e) => {
            let msg = format!("{:#}", anyhow_free(&e));
            assert!(!msg.contains('\n'), "{msg}");
        }
    }
});

/// The error and its causes on one line, as main prints them.
fn anyhow_free(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
