//! The gRPC status codes the guards end streams with (and `OK`, which the
//! metrics read), named once for the table of endings and the gRPC endings.

/// `OK`: in a response head, the service accepted the call (for metrics).
pub(crate) const OK: u32 = 0;

/// `CANCELLED`.
pub(crate) const CANCELLED: u32 = 1;

/// `DEADLINE_EXCEEDED`.
pub(crate) const DEADLINE_EXCEEDED: u32 = 4;

/// `RESOURCE_EXHAUSTED`.
pub(crate) const RESOURCE_EXHAUSTED: u32 = 8;

/// `UNAVAILABLE`.
pub(crate) const UNAVAILABLE: u32 = 14;
