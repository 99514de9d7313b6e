//! The one writer of the JSON lines this crate prints: end events, stats
//! snapshots, drain reports and connection events.

use std::fmt::{Display, Write as _};

/// One JSON object on one line, written key by key in the order given.
pub(crate) struct JsonLine {
    out: String,
}

impl JsonLine {
    pub(crate) fn new() -> Self {
        let mut out = String::with_capacity(256);
        out.push('{');
        JsonLine { out }
    }

    fn key(&mut self, key: &str) {
        if self.out.len() > 1 {
            self.out.push(',');
        }
        // Keys are this crate's own: plain ASCII, nothing to escape.
        let _ = write!(self.out, "\"{key}\":");
    }

    /// `"key":"value"`, the value escaped.
    pub(crate) fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        escape(&mut self.out, value);
        self
    }

    /// `"key":value`, for numbers (anything whose `Display` is valid JSON).
    pub(crate) fn num(&mut self, key: &str, value: impl Display) -> &mut Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    /// [`str`](Self::str) of the value's `Display`, or `null`.
    pub(crate) fn opt_str(&mut self, key: &str, value: Option<impl Display>) -> &mut Self {
        match value {
            Some(value) => self.str(key, &value.to_string()),
            None => self.null(key),
        }
    }

    /// [`num`](Self::num), or `null`.
    pub(crate) fn opt_num(&mut self, key: &str, value: Option<impl Display>) -> &mut Self {
        match value {
            Some(value) => self.num(key, value),
            None => self.null(key),
        }
    }

    fn null(&mut self, key: &str) -> &mut Self {
        self.key(key);
        self.out.push_str("null");
        self
    }

    pub(crate) fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.out);
        out.push('}');
        out
    }
}

/// Appends `s` as a JSON string literal.
fn escape(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::JsonLine;

    #[test]
    fn strings_are_escaped_and_missing_values_are_null() {
        let line = JsonLine::new()
            .str("s", "a\"b\\c\n\u{1}é")
            .num("n", 7)
            .opt_str("peer", None::<&str>)
            .opt_num("code", Some(4))
            .finish();
        assert_eq!(
            line,
            r#"{"s":"a\"b\\c\n\u0001é","n":7,"peer":null,"code":4}"#
        );
        assert_eq!(JsonLine::new().finish(), "{}");
    }
}
