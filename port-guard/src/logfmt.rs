//! Log values that cannot forge a field: logfmt quoting.
//!
//! Cgroup names and command names are chosen by whoever made them, unprivileged users included:
//! a cgroup named `x comm=libvirtd errno=EPERM` printed raw would add fields to the line. A value
//! that is empty or holds whitespace, a control character, `"` or `=` is written in double
//! quotes, with `\` and `"` escaped and control characters as `\n`, `\t`, `\r` or `\u{..}`.

use std::{borrow::Cow, fmt::Write as _};

fn needs_quotes(s: &str) -> bool {
    s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=')
}

/// `s` as a logfmt value.
pub fn value(s: &str) -> Cow<'_, str> {
    if !needs_quotes(s) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_stay_plain() {
        assert_eq!(value("/machine.slice/qemu-1"), "/machine.slice/qemu-1");
        assert_eq!(
            value("machine-qemu\\x2d1.scope"),
            "machine-qemu\\x2d1.scope"
        );
    }

    #[test]
    fn values_that_could_forge_a_field_are_quoted() {
        assert_eq!(
            value("/x comm=libvirtd pid=1 errno=EPERM"),
            "\"/x comm=libvirtd pid=1 errno=EPERM\""
        );
        assert_eq!(value("a=b"), "\"a=b\"");
        assert_eq!(value(""), "\"\"");
        assert_eq!(value("say \"hi\"\\"), "\"say \\\"hi\\\"\\\\\"");
        assert_eq!(value("line\nbreak\t\u{1b}"), "\"line\\nbreak\\t\\u{1b}\"");
        // What comes out never holds a bare space, newline or unescaped quote.
        for nasty in ["a b", "x\ny=1", "\"q", "\u{85}next", "\u{2028}"] {
            let v = value(nasty);
            let inner = &v[1..v.len() - 1];
            assert!(v.starts_with('"') && v.ends_with('"'), "{v}");
            assert!(!inner.contains('\n'));
            assert!(!inner.replace("\\\"", "").contains('"'), "{v}");
        }
    }
}
