//! Heartbeats: response data frames that move but do not count as activity.

use std::{fmt, sync::Arc};

use bytes::Buf;

/// Says which response data frames are heartbeats: frames a service sends
/// only to keep a quiet stream open (axum's
/// [`Sse::keep_alive`](https://docs.rs/axum/latest/axum/response/sse/struct.Sse.html#method.keep_alive)
/// comments, a gRPC server stream's application ping messages). They still
/// go to the peer and still count in the end event's
/// [`response()`](crate::EndEvent::response) frames and bytes, but they do
/// not reset the idle clock: a stream whose producer died while its
/// keep-alive timer ticks on ends at
/// [`response_idle_timeout`](crate::StreamGuardBuilder::response_idle_timeout)
/// (or [`idle_timeout`](crate::StreamGuardBuilder::idle_timeout)) as if it
/// were silent.
///
/// Set it for a whole layer with
/// [`StreamGuardBuilder::heartbeat`](crate::StreamGuardBuilder::heartbeat)
/// or per route with [`RoutePolicy::heartbeat`](crate::RoutePolicy::heartbeat).
///
/// - **Response frames only.** Request frames all count as activity: the
///   peer's own pings keep a stream open.
/// - **One data frame at a time.** The predicate sees the bytes of one
///   response data frame, as the service's body yields it. A frame whose
///   data is not contiguous (a [`Buf`] whose `chunk()` is not all of it) is
///   never a heartbeat and the predicate is not called for it; `Bytes`, the
///   data type of tonic's, axum's and most bodies, always is. For gRPC one
///   data frame can hold several messages (tonic puts the messages that are
///   ready at once into one frame), so a ping predicate should match a frame
///   made only of pings. Empty data frames count as nothing either way.
/// - **Cost.** Without a heartbeat, none: the response body decides once per
///   stream. With one: one call of the predicate per response data frame,
///   on the connection's task; keep it to a look at the first bytes. No lock,
///   allocation or timer work is added.
/// - **Panics.** The predicate runs where the response body does: a panic
///   in it ends the stream as [`EndReason::Panicked`](crate::EndReason::Panicked),
///   as the body's own would.
/// - **Stalled readers** are unchanged: a peer that stops reading stops
///   every frame, heartbeats included, and the idle timeout fires as before.
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::{Heartbeat, StreamGuardLayer};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let sse = Heartbeat::sse_comment();
/// assert!(sse.matches(b":\n\n")); // axum's default keep-alive
/// assert!(sse.matches(b": keep-alive\n\n")); // `KeepAlive::text("keep-alive")`
/// assert!(!sse.matches(b"data: {\"price\": 42}\n\n"));
/// assert!(!sse.matches(b": tick\ndata: 1\n\n")); // carries data: activity
///
/// // A gRPC ping message of its own: one encoded message, known in advance.
/// const PING: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];
/// let ping = Heartbeat::new(|frame| !frame.is_empty() && frame.chunks(PING.len()).all(|m| m == PING));
/// assert!(ping.matches(PING));
///
/// let guard = StreamGuardLayer::builder()
///     .response_idle_timeout(Duration::from_secs(30))
///     .heartbeat(sse)
///     .build()?;
/// # drop(guard);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Heartbeat(Arc<Kind>);

// Behind one thin `Arc`: an `Option<Heartbeat>` is one word in the
// response body and future.
enum Kind {
    /// [`Heartbeat::sse_comment`], known here so that a data frame costs a
    /// byte compared, not a call through a pointer.
    SseComment,
    Predicate(Predicate),
}

type Predicate = Box<dyn Fn(&[u8]) -> bool + Send + Sync>;

impl Heartbeat {
    /// A heartbeat for the frames `predicate` returns `true` for. It runs
    /// once per response data frame: keep it short and non-blocking.
    pub fn new<F>(predicate: F) -> Self
    where
        F: Fn(&[u8]) -> bool + Send + Sync + 'static,
    {
        Heartbeat(Arc::new(Kind::Predicate(Box::new(predicate))))
    }

    /// Server-sent-event comments: frames with at least one line and whose
    /// every non-empty line starts with `:`, as axum's `Sse::keep_alive`
    /// sends (`:\n\n` by default, `: text\n\n` with `KeepAlive::text`).
    /// Lines end at `\n`, `\r` or `\r\n`. A frame with an `event:`, `data:`,
    /// `id:` or `retry:` line is activity. Looks at each line's first byte
    /// only: a data frame costs one byte compared.
    ///
    /// ```
    /// use tower_stream_guard::Heartbeat;
    ///
    /// let sse = Heartbeat::sse_comment();
    /// assert!(sse.matches(b":\r\n\r\n"));
    /// assert!(sse.matches(b": one\n: two\n\n"));
    /// assert!(!sse.matches(b"\n\n")); // no comment in it
    /// assert!(!sse.matches(b"id: 7\n\n"));
    /// ```
    pub fn sse_comment() -> Self {
        Heartbeat(Arc::new(Kind::SseComment))
    }

    /// Whether `frame` (a response data frame's bytes) is a heartbeat.
    #[inline]
    pub fn matches(&self, frame: &[u8]) -> bool {
        match &*self.0 {
            Kind::SseComment => is_sse_comment(frame),
            Kind::Predicate(predicate) => predicate(frame),
        }
    }

    /// Whether `data`, `len` bytes long (`len > 0`), is a heartbeat: never
    /// when it is not contiguous.
    #[inline]
    pub(crate) fn beats<D: Buf>(&self, data: &D, len: usize) -> bool {
        let chunk = data.chunk();
        chunk.len() == len && self.matches(chunk)
    }
}

/// Two heartbeats are equal when both are
/// [`sse_comment`](Heartbeat::sse_comment), or clones of one made with
/// [`new`](Heartbeat::new) (the same predicate), so that
/// [`RoutePolicy`](crate::RoutePolicy) can be compared.
impl PartialEq for Heartbeat {
    fn eq(&self, other: &Self) -> bool {
        match (&*self.0, &*other.0) {
            (Kind::SseComment, Kind::SseComment) => true,
            _ => Arc::ptr_eq(&self.0, &other.0),
        }
    }
}

impl Eq for Heartbeat {}

impl fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self.0 {
            Kind::SseComment => f.write_str("Heartbeat(sse_comment)"),
            Kind::Predicate(_) => f.write_str("Heartbeat(..)"),
        }
    }
}

/// See [`Heartbeat::sse_comment`]. An event (`data:`, `event:`, ...) is
/// told apart by its first byte, inline; the rest is out of line.
#[inline]
fn is_sse_comment(frame: &[u8]) -> bool {
    matches!(frame.first(), Some(b':' | b'\n' | b'\r')) && comment_lines_only(frame)
}

#[inline(never)]
fn comment_lines_only(frame: &[u8]) -> bool {
    let mut comment = false;
    let mut rest = frame;
    loop {
        // Skip line ends (blank lines included) to the next line's start.
        let Some(start) = rest.iter().position(|&b| b != b'\n' && b != b'\r') else {
            return comment;
        };
        if rest[start] != b':' {
            return false;
        }
        comment = true;
        rest = &rest[start..];
        match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(end) => rest = &rest[end..],
            None => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Buf, Bytes};

    use super::*;

    #[test]
    fn sse_comment_matches_comment_only_frames() {
        for frame in [
            &b":\n\n"[..],
            b": keep-alive\n\n",
            b":\r\n\r\n",
            b":\r\r",
            b": a\n:b\r\n: c\r\r\n",
            b":",
            b"\n: after a blank line\n\n",
            b":data: still a comment\n\n",
        ] {
            assert!(
                is_sse_comment(frame),
                "{:?}",
                String::from_utf8_lossy(frame)
            );
        }
    }

    #[test]
    fn sse_comment_rejects_frames_with_fields_or_no_comment() {
        for frame in [
            &b""[..],
            b"\n\n",
            b"\r\n",
            b"data: x\n\n",
            b": hi\ndata: x\n\n",
            b"data: x\n: hi\n\n",
            b"event: tick\n\n",
            b" : leading space\n\n",
            b"retry: 10\n\n",
        ] {
            assert!(
                !is_sse_comment(frame),
                "{:?}",
                String::from_utf8_lossy(frame)
            );
        }
    }

    #[test]
    fn a_frame_in_pieces_is_never_a_heartbeat() {
        let all = Heartbeat::new(|_| true);
        let whole = Bytes::from_static(b":\n\n");
        assert!(all.beats(&whole, whole.remaining()));
        let pieces = Bytes::from_static(b":").chain(Bytes::from_static(b"\n\n"));
        assert!(!all.beats(&pieces, pieces.remaining()));
    }

    /// The response body and the response future each hold one.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn an_optional_heartbeat_is_one_word() {
        assert_eq!(std::mem::size_of::<Option<Heartbeat>>(), 8);
    }

    #[test]
    fn clones_are_equal_and_separate_predicates_are_not() {
        let one = Heartbeat::new(is_sse_comment);
        assert_eq!(one, one.clone());
        assert_ne!(one, Heartbeat::new(is_sse_comment));
        assert_ne!(one, Heartbeat::sse_comment());
        assert_eq!(Heartbeat::sse_comment(), Heartbeat::sse_comment());
        assert_eq!(format!("{one:?}"), "Heartbeat(..)");
        assert_eq!(
            format!("{:?}", Heartbeat::sse_comment()),
            "Heartbeat(sse_comment)"
        );
    }
}
