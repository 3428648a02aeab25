//! Assertions on the text a command printed (stderr, mostly).

/// Whether `hay` contains `needle` as a token: not preceded or followed by a letter or digit
/// (so "0" in `"0"` or `0:` matches but the 0 in "61500" does not).
pub fn contains_token(hay: &str, needle: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric();
    hay.match_indices(needle).any(|(i, _)| {
        let before = hay[..i].chars().next_back();
        let after = hay[i + needle.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

/// The only line of `stderr`; panics unless it is exactly one non-empty line (a single trailing
/// newline is fine).
pub fn single_line(stderr: &str) -> &str {
    let body = stderr.strip_suffix('\n').unwrap_or(stderr);
    let lines: Vec<&str> = body.split('\n').collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty(),
        "expected exactly one non-empty line on stderr, got {} line(s):\n{stderr}",
        lines.len()
    );
    lines[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(contains_token("bad range \"0\": expected", "0"));
        assert!(!contains_token("61500-61510", "0"));
        assert!(contains_token("bad path /a/../b (no ..)", "/a/../b"));
        assert!(contains_token("x 5000-4000: first > last", "5000-4000"));
    }

    #[test]
    fn single_line_checks() {
        assert_eq!(single_line("oops\n"), "oops");
        assert_eq!(single_line("oops"), "oops");
    }

    #[test]
    #[should_panic]
    fn single_line_rejects_two() {
        single_line("a\nb\n");
    }

    #[test]
    #[should_panic]
    fn single_line_rejects_empty() {
        single_line("");
    }
}
