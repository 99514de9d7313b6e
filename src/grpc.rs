//! Endings a gRPC client can read.
//!
//! A response body that errors makes hyper reset the HTTP/2 stream, and a tonic
//! client then reports `Internal "h2 protocol error"`. So when a guard ends a
//! gRPC response (content-type `application/grpc*`) it sends trailers instead:
//! `grpc-status: 4` (`DEADLINE_EXCEEDED`) and a `grpc-message` naming the guard.
//! Before response headers exist, it answers with a trailers-only response
//! carrying the same status. Plain HTTP responses get a body error (RST_STREAM
//! on HTTP/2), or before headers a response of the guard's own: `408 Request
//! Timeout` when the request body went silent, `503 Service Unavailable` for a
//! cap or a drain (with a `Retry-After` when it refused the stream, see
//! [`StreamGuardBuilder::retry_after`](crate::StreamGuardBuilder::retry_after)),
//! `504 Gateway Timeout` otherwise.
//!
//! # The `stream-guard-reason` trailer
//!
//! Everything the guard writes itself (those trailers, the trailers-only
//! response, a plain-HTTP answer before headers) also carries
//! `stream-guard-reason` with [`EndReason::as_str`](crate::EndReason::as_str)
//! of the end: `idle_timeout`, `lifetime_exceeded`, `rejected`, `drained`,
//! or `cancelled` for [`StreamHandle::cancel`](crate::StreamHandle::cancel).
//! So a client tells a guard's `DEADLINE_EXCEEDED` from the server's own by
//! that key, not by the message text. A guard on the client side reads it
//! back: [`EndEvent::server_guard_reason`](crate::EndEvent::server_guard_reason).

use std::{fmt::Write as _, time::Duration};

use http::{
    HeaderMap, HeaderValue, Response, StatusCode,
    header::{CONTENT_TYPE, HeaderName, RETRY_AFTER},
};

use crate::end::Ending;

// Parsed once, not on every lookup.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// Names the guard's reason for an end it wrote itself.
const GUARD_REASON: HeaderName = HeaderName::from_static("stream-guard-reason");

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

// The status codes, shared with the table of endings.
pub(crate) use crate::status::DEADLINE_EXCEEDED;

/// The client's deadline from a `grpc-timeout` header: up to eight ASCII
/// digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`). Anything else is
/// ignored, as if the header were absent.
pub(crate) fn timeout_of(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Whether headers announce a gRPC message stream.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The `grpc-status` in `headers`, if any and well formed.
pub(crate) fn status_of(headers: &HeaderMap) -> Option<u32> {
    let value = headers.get(&GRPC_STATUS)?.to_str().ok()?;
    value.parse().ok()
}

/// Percent-encodes a `grpc-message` value as the gRPC HTTP/2 spec asks:
/// bytes outside printable ASCII, and `%` itself, become `%XX`.
pub(crate) fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Writes `grpc-status`, `grpc-message` and `stream-guard-reason` into
/// `headers`.
fn put_status(headers: &mut HeaderMap, code: u32, message: &str, reason: &'static str) {
    headers.insert(GRPC_STATUS, HeaderValue::from(code));
    // Percent-encoding leaves only visible ASCII, which is always a valid
    // header value.
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert(GRPC_MESSAGE, value);
    }
    headers.insert(GUARD_REASON, HeaderValue::from_static(reason));
}

/// Trailers that end a gRPC response with `code` and `message`, naming the
/// guard's `reason` ([`EndReason::as_str`](crate::EndReason::as_str)).
pub(crate) fn trailers(code: u32, message: &str, reason: &'static str) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    put_status(&mut headers, code, message, reason);
    headers
}

/// The reason a guard named in `headers` (`stream-guard-reason`), as the
/// first ending of that name, if it is one a guard writes; anything else
/// reads as none.
pub(crate) fn guard_reason_of(headers: &HeaderMap) -> Option<Ending> {
    Ending::guard_named(headers.get(&GUARD_REASON)?.as_bytes())
}

/// A response made by the guard before the service produced one, for a
/// stream that ended as `ending`: trailers-only for gRPC, otherwise `status`
/// (by default [`Ending::http_status`]), with `Retry-After:
/// retry_after_secs` when the guard refused the stream. Either way
/// `stream-guard-reason` names the reason.
pub(crate) fn early_response<B>(
    grpc: bool,
    ending: Ending,
    message: &str,
    status: StatusCode,
    retry_after_secs: u64,
    body: B,
) -> Response<B> {
    let mut response = Response::new(body);
    let reason = ending.reason().as_str();
    let headers = response.headers_mut();
    if grpc {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let code = ending.status().unwrap_or(DEADLINE_EXCEEDED);
        put_status(headers, code, message, reason);
    } else {
        headers.insert(GUARD_REASON, HeaderValue::from_static(reason));
        if ending.is_refusal() {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        *response.status_mut() = status;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_visible_ascii_and_escapes_the_rest() {
        assert_eq!(percent_encode("idle 5s"), "idle 5s");
        assert_eq!(percent_encode("100%"), "100%25");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }

    #[test]
    fn grpc_content_types_are_recognised() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_grpc(&h));
    }

    #[test]
    fn malformed_status_is_ignored() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("x"));
        assert_eq!(status_of(&h), None);
        h.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(status_of(&h), Some(14));
    }

    #[test]
    fn early_grpc_response_is_trailers_only() {
        let r = early_response(
            true,
            Ending::Lifetime,
            "too long",
            StatusCode::IM_A_TEAPOT,
            1,
            (),
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(status_of(r.headers()), Some(4));
        assert_eq!(r.headers()["grpc-message"], "too long");
        assert_eq!(
            guard_reason_of(r.headers()).map(Ending::name),
            Some("lifetime_exceeded")
        );
        assert!(r.headers().get(RETRY_AFTER).is_none());
        let r = early_response(
            true,
            Ending::RejectedTotal,
            "full",
            StatusCode::IM_A_TEAPOT,
            1,
            (),
        );
        assert_eq!(status_of(r.headers()), Some(8));
        assert!(r.headers().get(RETRY_AFTER).is_none());
    }

    #[test]
    fn early_plain_response_status_says_who_stalled() {
        let status =
            |ending| early_response(false, ending, "", ending.http_status(), 7, ()).status();
        assert_eq!(status(Ending::IdleRequest), StatusCode::REQUEST_TIMEOUT);
        for ending in [
            Ending::IdleResponse,
            Ending::IdleBoth,
            Ending::Lifetime,
            Ending::ClientDeadline,
            Ending::CancelledByHandle,
        ] {
            assert_eq!(status(ending), StatusCode::GATEWAY_TIMEOUT, "{ending:?}");
        }
        for ending in [
            Ending::RejectedPerPeer,
            Ending::RejectedNoConnection,
            Ending::DrainRefused,
        ] {
            let r = early_response(false, ending, "", ending.http_status(), 7, ());
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{ending:?}");
            assert_eq!(r.headers()[RETRY_AFTER], "7", "{ending:?}");
        }
        let cut = early_response(
            false,
            Ending::Drained,
            "",
            Ending::Drained.http_status(),
            7,
            (),
        );
        assert_eq!(cut.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(cut.headers().get(RETRY_AFTER).is_none());
        assert_eq!(
            guard_reason_of(cut.headers()).map(Ending::name),
            Some("drained")
        );
    }

    #[test]
    fn only_the_names_a_guard_writes_are_read_back() {
        let read = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(GUARD_REASON, HeaderValue::from_static(v));
            guard_reason_of(&h).map(Ending::name)
        };
        for name in [
            "idle_timeout",
            "lifetime_exceeded",
            "rejected",
            "drained",
            "cancelled",
        ] {
            assert_eq!(read(name), Some(name));
        }
        for other in ["completed", "error", "IDLE_TIMEOUT", "idle_timeout ", "x"] {
            assert_eq!(read(other), None, "{other:?}");
        }
        assert_eq!(guard_reason_of(&HeaderMap::new()), None);
    }

    #[test]
    fn grpc_timeout_header_is_parsed_or_ignored() {
        let parse = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(
                "grpc-timeout",
                HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
            timeout_of(&h)
        };
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "100", "100x", "123456789S", "-1S", "1.5S", "１S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(timeout_of(&HeaderMap::new()), None);
    }
}
