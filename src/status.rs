//! The gRPC status codes the guards end streams with, named once for the
//! table of endings and the gRPC endings.

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
