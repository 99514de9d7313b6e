//! What of a response body follows its head: the one reading of the head
//! that both the response future (does the head end the stream?) and the
//! response body (which byte is the last?) follow.
//!
//! hyper does not always poll a response body to its end. Its HTTP/1 server
//! writes the head of a `HEAD` request's answer, of a `204` or `304` answer
//! and of an answer that declares a length of 0 alone (an interim `1xx` as
//! the final answer it refuses, and sends `500` instead), and drops the
//! body unpolled; after the last byte of a declared length it stops polling
//! and drops the body too. Its HTTP/2 server polls the body it is given to
//! its end, but a body at its end goes out as a head with `END_STREAM`. So a
//! head that no body may follow is the stream's last part in both versions
//! (and its body is closed from the start, so that HTTP/2 sends nothing
//! either), and a declared length is counted down to its last byte.

use http::{Response, StatusCode};
use http_body::Body;

use crate::end::Ending;

/// What follows a response's head, read once per stream from the head, the
/// body's `is_end_stream` and size hint, and the request's method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Follows {
    /// Nothing: the head is the response's last part and its body is never
    /// read (already at its end, a declared length of 0, or a status that
    /// carries no body).
    Nothing,
    /// Nothing: an interim status (`1xx`) answered as the final one. hyper
    /// refuses it (its HTTP/1 sends `500` instead, its HTTP/2 peer resets
    /// the stream), so the stream ends at the head as an error.
    Interim,
    /// Nothing, for the answer to a `HEAD` request; but the body's size hint
    /// still goes out, as the `content-length` its `GET` would have.
    HeadOnly,
    /// This many bytes (at least one): hyper's HTTP/1 stops polling after
    /// the last, so that byte delivers the body; over HTTP/2 trailers may
    /// still follow it.
    Bytes(u64),
    /// Whatever the body yields until its end.
    Body,
}

impl Follows {
    /// Reads `response`'s head; `head` says it answers a `HEAD` request.
    /// Calls the body's `is_end_stream` and `size_hint` (the service's code).
    pub(crate) fn of<B: Body>(response: &Response<B>, head: bool) -> Self {
        let status = response.status();
        // `101` hands the connection over: how long its stream lasts is the
        // upgrade's business, not this head's.
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            return Follows::Interim;
        }
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Follows::Nothing;
        }
        if head {
            return Follows::HeadOnly;
        }
        if response.body().is_end_stream() {
            return Follows::Nothing;
        }
        match declared_length(response) {
            Some(0) => Follows::Nothing,
            Some(bytes) => Follows::Bytes(bytes),
            None => Follows::Body,
        }
    }

    /// Whether the head is the response's last part.
    pub(crate) fn nothing(self) -> bool {
        !matches!(self, Follows::Bytes(_) | Follows::Body)
    }

    /// How the stream ends when the head is its last part.
    pub(crate) fn ending(self) -> Ending {
        match self {
            Follows::Interim => Ending::Error,
            _ => Ending::Completed,
        }
    }

    /// The bytes left to the body's last declared one, if declared.
    pub(crate) fn declared(self) -> Option<u64> {
        match self {
            Follows::Bytes(bytes) => Some(bytes),
            _ => None,
        }
    }
}

/// The length a response declares for its body: its `content-length`, else
/// its body's exact size hint (which hyper sends as the `content-length`).
fn declared_length<B: Body>(response: &Response<B>) -> Option<u64> {
    match response.headers().get(http::header::CONTENT_LENGTH) {
        Some(value) => value.to_str().ok()?.trim().parse().ok(),
        None => response.body().size_hint().exact(),
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{Empty, Full};

    use super::*;

    fn full(status: u16) -> Response<Full<bytes::Bytes>> {
        let mut response = Response::new(Full::new(bytes::Bytes::from_static(b"hello")));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        response
    }

    #[test]
    fn statuses_without_a_body_end_at_the_head_whatever_the_body_says() {
        for status in [204, 304] {
            assert_eq!(Follows::of(&full(status), false), Follows::Nothing);
            assert_eq!(Follows::of(&full(status), true), Follows::Nothing);
        }
        for status in [100, 103] {
            assert_eq!(Follows::of(&full(status), false), Follows::Interim);
            assert_eq!(Follows::of(&full(status), false).ending(), Ending::Error);
        }
        assert_eq!(Follows::of(&full(200), false), Follows::Bytes(5));
        assert_eq!(Follows::of(&full(101), false), Follows::Bytes(5));
        assert_eq!(Follows::of(&full(200), true), Follows::HeadOnly);
    }

    #[test]
    fn a_declared_length_of_zero_or_a_body_at_its_end_is_nothing() {
        let mut response = full(200);
        response
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, 0.into());
        assert_eq!(Follows::of(&response, false), Follows::Nothing);
        let empty = Response::new(Empty::<bytes::Bytes>::new());
        assert_eq!(Follows::of(&empty, false), Follows::Nothing);
        let mut response = full(200);
        response
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, 7.into());
        assert_eq!(Follows::of(&response, false), Follows::Bytes(7));
    }
}
