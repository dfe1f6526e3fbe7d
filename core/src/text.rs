//! Text from files, made safe to print: a prefix cut at a character boundary (a fingerprint read
//! from a hand-edited file may be short or not ASCII), and control characters escaped (a name or
//! a URL from a file must not move the terminal's cursor or forge a line of output).

/// The first `n` characters of `s` (all of it when shorter).
pub fn short(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

/// `s` with every control character written as an escape (`\n`, `\u{1b}`), the rest as it is.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| match c.is_control() {
                true => c.escape_default().to_string(),
                false => c.to_string(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixes_and_escapes() {
        assert_eq!(super::short("abcdef", 3), "abc");
        assert_eq!(super::short("ab", 3), "ab");
        assert_eq!(super::short("日本語です", 2), "日本");
        assert_eq!(super::printable("a\nb\u{1b}[2Jc"), "a\\nb\\u{1b}[2Jc");
        assert_eq!(super::printable("plain é"), "plain é");
    }
}
