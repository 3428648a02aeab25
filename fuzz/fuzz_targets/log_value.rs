//! Log values: whatever a cgroup or command name holds, the value written for it is one token of
//! the line (no whitespace or `=` outside quotes, no raw control character) and reads back as
//! the name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use port_guard::logfmt::value;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let v = value(s);
    assert!(!v.chars().any(|c| c.is_control()), "{v:?}");
    if !v.starts_with('"') {
        assert_eq!(v, s);
        assert!(!s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c == '=' || c == '"'));
        return;
    }
    // Quoted: unescape and compare; the only bare quote is the last character.
    let inner = &v[1..v.len() - 1];
    let mut back = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => panic!("a bare quote inside {v:?}"),
            '\\' => match chars.next() {
                Some('"') => back.push('"'),
                Some('\\') => back.push('\\'),
                Some('n') => back.push('\n'),
                Some('t') => back.push('\t'),
                Some('r') => back.push('\r'),
                Some('u') => {
                    assert_eq!(chars.next(), Some('{'));
                    let hex: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    back.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                other => panic!("unknown escape {other:?} in {v:?}"),
            },
            c => back.push(c),
        }
    }
    assert_eq!(back, s);
});
