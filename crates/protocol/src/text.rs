//! Strings that come from a peer, made safe to log: names are checked against a strict syntax
//! before anything logs them, and free text (reasons, failure messages) is escaped and
//! truncated, so a peer can neither forge log lines with a newline nor flood a log with one
//! enormous line.

use std::borrow::Cow;

/// Longest name (connector, agent, agent id, software version) a peer may send.
pub const MAX_NAME_LEN: usize = 64;
/// Most characters of a peer's free text that reach a log line.
pub const MAX_LOGGED_CHARS: usize = 256;

/// Whether `name` is a valid connector, agent, id or version name: 1 to [`MAX_NAME_LEN`]
/// ASCII letters, digits and `.`, `-`, `_`, `+`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'+'))
}

/// Most characters of a message of our own (which may quote a peer's text, escaped) shown in a
/// status: the certificate explanations run to several hundred, and must not stop mid-sentence.
pub const MAX_SHOWN_CHARS: usize = 2048;

/// `text` as it may appear in a log line: control characters (newlines included) escaped,
/// and cut after [`MAX_LOGGED_CHARS`] characters with a note of how much was left out.
pub fn loggable(text: &str) -> Cow<'_, str> {
    loggable_within(text, MAX_LOGGED_CHARS)
}

/// [`loggable`], cut after `max` characters instead.
pub fn loggable_within(text: &str, max: usize) -> Cow<'_, str> {
    let clean = text.chars().take(max).all(|c| !c.is_control());
    let long = text.chars().nth(max).is_some();
    if clean && !long {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(max.min(text.len()) + 32);
    for c in text.chars().take(max) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if long {
        let kept: usize = text.chars().take(max).map(char::len_utf8).sum();
        out.push_str(&format!("… ({} more bytes)", text.len() - kept));
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_strict() {
        for good in ["onprem-east", "agent_1", "vm.example", "0.1.0+build.7", "a1b2c3"] {
            assert!(is_valid_name(good), "{good}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in ["", "a b", "evil\nagent connected", "x\u{1b}[31m", "ü", long.as_str()] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn free_text_cannot_forge_or_flood_a_log_line() {
        assert_eq!(loggable("no such host"), "no such host");
        let forged = loggable("ok\n2026-12-01T00:00:00Z INFO agent connected");
        assert!(!forged.contains('\n') && forged.contains("\\n"), "{forged}");
        let huge = "x".repeat(60_000);
        let cut = loggable(&huge);
        assert!(cut.len() < MAX_LOGGED_CHARS + 40, "{}", cut.len());
        assert!(cut.ends_with(&format!("({} more bytes)", 60_000 - MAX_LOGGED_CHARS)), "{cut}");
        // Cutting never splits a character.
        let wide = "é".repeat(MAX_LOGGED_CHARS + 1);
        assert!(loggable(&wide).starts_with(&"é".repeat(MAX_LOGGED_CHARS)));
    }
}
