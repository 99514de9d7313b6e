//! Endings a gRPC client can read.
//!
//! A response body that errors makes hyper reset the HTTP/2 stream, and a tonic
//! client then reports `Internal "h2 protocol error"`. So when a guard ends a
//! gRPC response (content-type `application/grpc*`) it sends trailers instead:
//! `grpc-status: 4` (`DEADLINE_EXCEEDED`) and a `grpc-message` naming the guard.
//! Before response headers exist, it answers with a trailers-only response
//! carrying the same status. Plain HTTP responses get a body error (RST_STREAM
//! on HTTP/2), or a `504 Gateway Timeout` before headers.

use std::{fmt::Write as _, time::Duration};

use http::{
    HeaderMap, HeaderValue, Response, StatusCode,
    header::{CONTENT_TYPE, HeaderName},
};

// Parsed once, not on every lookup.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `CANCELLED`.
pub(crate) const CANCELLED: u32 = 1;

/// `DEADLINE_EXCEEDED`.
pub(crate) const DEADLINE_EXCEEDED: u32 = 4;

/// `RESOURCE_EXHAUSTED`.
pub(crate) const RESOURCE_EXHAUSTED: u32 = 8;

/// `UNIMPLEMENTED`: what tonic answers a method it does not serve with.
pub(crate) const UNIMPLEMENTED: u32 = 12;

/// `UNAVAILABLE`.
pub(crate) const UNAVAILABLE: u32 = 14;

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

/// Writes `grpc-status` and `grpc-message` into `headers`.
pub(crate) fn put_status(headers: &mut HeaderMap, code: u32, message: &str) {
    headers.insert(GRPC_STATUS, HeaderValue::from(code));
    // Percent-encoding leaves only visible ASCII, which is always a valid
    // header value.
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert(GRPC_MESSAGE, value);
    }
}

/// Trailers that end a gRPC response with `code` and `message`.
pub(crate) fn trailers(code: u32, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(2);
    put_status(&mut headers, code, message);
    headers
}

/// The HTTP status a plain-HTTP response made by the guard carries for a
/// given gRPC code: `503` for a refusal, `504` for a limit.
fn http_status(code: u32) -> StatusCode {
    match code {
        RESOURCE_EXHAUSTED | UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// A response made by the guard before the service produced one: trailers-only
/// for gRPC, `504 Gateway Timeout` (a limit) or `503 Service Unavailable` (a
/// refusal or a drain) otherwise.
pub(crate) fn early_response<B>(grpc: bool, code: u32, message: &str, body: B) -> Response<B> {
    let mut response = Response::new(body);
    if grpc {
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        put_status(headers, code, message);
    } else {
        *response.status_mut() = http_status(code);
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
        let r = early_response(true, DEADLINE_EXCEEDED, "too long", ());
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(status_of(r.headers()), Some(4));
        assert_eq!(r.headers()["grpc-message"], "too long");
        let r = early_response(false, DEADLINE_EXCEEDED, "too long", ());
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        let r = early_response(false, RESOURCE_EXHAUSTED, "full", ());
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
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
