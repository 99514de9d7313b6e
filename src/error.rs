//! The error a guarded body yields when a guard ends its stream.

use std::{error::Error, fmt, time::Duration};

use crate::{cap::StreamCap, event::EndReason, policy::IdleDirection};

/// A boxed error, as bodies of this crate return.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// A guard ended the stream.
///
/// Yielded by a guarded request body (the handler sees it from its next read)
/// and by a guarded plain-HTTP response body (hyper then resets the stream).
/// Find it with `downcast_ref::<GuardError>()` on a body error. With the
/// `tonic` feature its [`source`](Error::source) is a `tonic::Status` with
/// the reason's code ([`EndReason::grpc_code`]: `DEADLINE_EXCEEDED` for a
/// limit), so tonic's `Streaming::message()` returns exactly that status to
/// the handler.
#[derive(Debug)]
pub struct GuardError {
    reason: EndReason,
    limit: Duration,
    message: String,
    code: u32,
    #[cfg(feature = "tonic")]
    status: tonic::Status,
}

impl GuardError {
    pub(crate) fn new(reason: EndReason, limit: Duration, message: String, code: u32) -> Self {
        GuardError {
            reason,
            limit,
            #[cfg(feature = "tonic")]
            status: tonic::Status::new(tonic::Code::from_i32(code as i32), message.clone()),
            message,
            code,
        }
    }

    /// The gRPC status code the stream ends with: `4` (`DEADLINE_EXCEEDED`)
    /// for a limit, `8` for a cap, `14` for a drain, `1` (`CANCELLED`) for
    /// [`StreamHandle::cancel`](crate::StreamHandle::cancel).
    pub fn grpc_code(&self) -> u32 {
        self.code
    }

    /// Which guard ended the stream ([`EndReason::Cancelled`] when its
    /// handle did).
    pub fn reason(&self) -> EndReason {
        self.reason
    }

    /// The configured limit that was reached (zero for a rejection).
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

/// The sentence users see when a client's `grpc-timeout` ended its stream.
pub(crate) fn describe_client_deadline(limit: Duration) -> String {
    format!("stream passed the deadline of {limit:?} the client set (grpc-timeout)")
}

/// The sentence users see when a drain refused a new stream.
pub(crate) fn describe_drain_refusal() -> String {
    "stream refused: the server is draining and accepts no new streams (drain)".to_owned()
}

/// The sentence users see when a cap refused a stream.
pub(crate) fn describe_rejection(cap: StreamCap, limit: usize) -> String {
    format!(
        "stream refused: at most {limit} concurrent streams {cap} ({})",
        cap.setting()
    )
}

/// The sentence users see, in errors, `grpc-message` and logs.
pub(crate) fn describe(reason: EndReason, limit: Duration) -> String {
    match reason {
        EndReason::IdleTimeout(IdleDirection::Both) => {
            format!("stream idle: no frame moved either way for {limit:?} (idle_timeout)")
        }
        EndReason::IdleTimeout(IdleDirection::Request) => {
            format!("stream idle: no request frame for {limit:?} (request_idle_timeout)")
        }
        EndReason::IdleTimeout(IdleDirection::Response) => {
            format!("stream idle: no response frame for {limit:?} (response_idle_timeout)")
        }
        EndReason::LifetimeExceeded => {
            format!("stream exceeded its maximum lifetime of {limit:?} (max_lifetime)")
        }
        EndReason::Drained => {
            format!(
                "stream cut: the server is draining and its {limit:?} grace period ended (drain)"
            )
        }
        other => format!("stream ended: {other}"),
    }
}

impl fmt::Display for GuardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error for GuardError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        #[cfg(feature = "tonic")]
        return Some(&self.status);
        #[cfg(not(feature = "tonic"))]
        None
    }
}

#[cfg(feature = "tonic")]
impl From<GuardError> for tonic::Status {
    fn from(err: GuardError) -> Self {
        err.status
    }
}

#[cfg(all(test, feature = "tonic"))]
mod tests {
    use super::*;

    #[test]
    fn tonic_finds_deadline_exceeded_in_the_source_chain() {
        let reason = EndReason::IdleTimeout(IdleDirection::Request);
        let limit = Duration::from_secs(2);
        let err: BoxError = Box::new(GuardError::new(reason, limit, describe(reason, limit), 4));
        let status = tonic::Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            "stream idle: no request frame for 2s (request_idle_timeout)"
        );
    }
}
