//! Redis glob patterns (`*`, `?`, `[…]`, `\` escapes), as `PSUBSCRIBE` and `KEYS` read them,
//! matched against a request path: the grants of a token (SPEC §8).
//!
//! Owns: [`matches`], and [`covers`] (whether a grant covers every path a pattern path can
//! match). Must not: allocate or recurse: a pattern comes from a token and a path
//! from a client, so the cost is bounded by their lengths (O(pattern × path) at worst, with
//! the usual one-star backtracking).

/// Whether `text` matches `pattern` in Redis glob syntax: `*` any run of bytes (`/` included),
/// `?` one byte, `[abc]`, `[a-z]`, `[^a]` one byte of a set, `\x` the byte `x`.
pub(crate) fn matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: the pattern just past it, and the text position it
    // has absorbed up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    // Consecutive stars are one.
                    while p < pattern.len() && pattern[p] == b'*' {
                        p += 1;
                    }
                    if p == pattern.len() {
                        return true;
                    }
                    star = Some((p, t));
                    continue;
                }
                _ => {
                    if let Some((matched, next)) = one(pattern, p, text[t]) {
                        if matched {
                            p = next;
                            t += 1;
                            continue;
                        }
                    }
                }
            }
        }
        // A mismatch (or the pattern ran out): let the last star take one more byte.
        match star {
            Some((after_star, absorbed)) => {
                p = after_star;
                t = absorbed + 1;
                star = Some((after_star, absorbed + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Match one byte against the single-byte pattern element at `p` (not a `*`): whether it
/// matched and where the next element starts; `None` when the element is malformed at the
/// end of the pattern (then it matches nothing).
fn one(pattern: &[u8], p: usize, byte: u8) -> Option<(bool, usize)> {
    match pattern[p] {
        b'?' => Some((true, p + 1)),
        b'\\' if p + 1 < pattern.len() => Some((pattern[p + 1] == byte, p + 2)),
        b'[' => {
            let mut i = p + 1;
            let negate = pattern.get(i) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut found = false;
            loop {
                match pattern.get(i) {
                    // An unclosed set ends at the pattern's end, as in Redis.
                    None => break,
                    Some(b']') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < pattern.len() => {
                        found |= pattern[i + 1] == byte;
                        i += 2;
                    }
                    Some(&lo) if pattern.get(i + 1) == Some(&b'-') && i + 2 < pattern.len() => {
                        let hi = pattern[i + 2];
                        let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                        found |= (lo..=hi).contains(&byte);
                        i += 3;
                    }
                    Some(&c) => {
                        found |= c == byte;
                        i += 1;
                    }
                }
            }
            Some((found != negate, i))
        }
        c => Some((c == byte, p + 1)),
    }
}

/// Whether `path` holds a glob character (a subscriber's pattern path, SPEC §9).
pub(crate) fn is_pattern(path: &[u8]) -> bool {
    path.iter().any(|b| matches!(b, b'*' | b'?' | b'['))
}

/// Whether every text `pattern` can match is matched by `grant` too, as far as a cheap,
/// conservative rule can tell: the two are the same, or `grant` is a literal prefix and one
/// final `*` and `pattern`'s literal start (up to its first glob character) begins with that
/// prefix. Anything else is refused, though it might be covered.
pub(crate) fn covers(grant: &[u8], pattern: &[u8]) -> bool {
    if grant == pattern {
        return true;
    }
    let special = |b: &u8| matches!(b, b'*' | b'?' | b'[' | b'\\');
    let Some(prefix) = grant.strip_suffix(b"*") else {
        return false;
    };
    if prefix.iter().any(special) {
        return false;
    }
    let literal = pattern
        .iter()
        .position(special)
        .map_or(pattern, |end| &pattern[..end]);
    literal.starts_with(prefix)
}

#[cfg(test)]
mod tests {
    use super::{covers, matches};

    fn m(p: &str, t: &str) -> bool {
        matches(p.as_bytes(), t.as_bytes())
    }

    #[test]
    fn star_matches_any_run_slashes_included() {
        assert!(m("*", "/"));
        assert!(m("*", "/a/b/c"));
        assert!(m("/sensors/*", "/sensors/pi-1"));
        assert!(m("/sensors/*", "/sensors/a/b"));
        assert!(!m("/sensors/*", "/sensor"));
        assert!(m("/a*c", "/abbbc"));
        assert!(!m("/a*c", "/abbbd"));
        assert!(m("/*/temp", "/office/temp"));
        assert!(!m("/*/temp", "/office/hum"));
    }

    #[test]
    fn question_mark_sets_and_escapes() {
        assert!(m("/pi-?", "/pi-1"));
        assert!(!m("/pi-?", "/pi-12"));
        assert!(m("/pi-[0-9]", "/pi-7"));
        assert!(!m("/pi-[0-9]", "/pi-x"));
        assert!(m("/pi-[^0-9]", "/pi-x"));
        assert!(!m("/pi-[^0-9]", "/pi-3"));
        assert!(m("/[abc]", "/b"));
        assert!(m("/a\\*", "/a*"));
        assert!(!m("/a\\*", "/ab"));
    }

    #[test]
    fn exact_paths_match_only_themselves() {
        assert!(m("/office", "/office"));
        assert!(!m("/office", "/office/desk"));
        assert!(!m("/office", "/offic"));
        assert!(!m("", "/"));
    }

    #[test]
    fn many_stars_stay_linear_enough() {
        let pattern = "*a".repeat(50);
        let text = "a".repeat(8192) + "b";
        assert!(!m(&pattern, &text));
    }

    #[test]
    fn a_grant_covers_a_pattern_only_when_every_match_is_granted() {
        assert!(covers(b"/office/*", b"/office/a*"));
        assert!(covers(b"/office/*", b"/office/[ab]/*"));
        assert!(covers(b"*", b"/anything/*"));
        assert!(covers(b"/office/a*", b"/office/a*"));
        // Its text matches, but `/office/abc` would not be granted.
        assert!(matches(b"/office/a?", b"/office/a*"));
        assert!(!covers(b"/office/a?", b"/office/a*"));
        assert!(!covers(b"/office/*", b"/*"));
        assert!(!covers(b"/office/*", b"/off*"));
        assert!(!covers(b"/of?ice/*", b"/office/*"));
        assert!(!covers(b"/office/a", b"/office/*"));
    }
}
