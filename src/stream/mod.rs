//! The stream guard: the layer and its builder, the service, its response
//! future and the body wrappers.
//!
//! The family's pieces, in the order a request meets them:
//!
//! - [`StreamGuardLayer`](crate::StreamGuardLayer), built once with a
//!   [`StreamGuardBuilder`](crate::StreamGuardBuilder) (limits, caps,
//!   [routes](crate::RoutePolicy), a [`Drain`](crate::Drain), subscribers);
//!   clones share everything;
//! - [`StreamGuard`], the service the layer wraps around yours; its
//!   [`WrapRequestBody`] parameter says what request body your service
//!   receives ([`PlainBody`] by default);
//! - [`ResponseFuture`], its future: your service's future, or the guard's
//!   own answer when a cap refused the stream or a guard fired before the
//!   response headers;
//! - [`RequestBody`] and [`ResponseBody`], the body wrappers that count
//!   frames and end the way a peer can read once a guard fires;
//! - the [`StreamHandle`](crate::StreamHandle) your service finds in the
//!   request extensions, and one [`EndEvent`](crate::EndEvent) per stream.
//!
//! # How a stream flows
//!
//! `call` starts the stream: it picks the route, finds the connection and
//! peer in the request extensions, creates the stream's record (its counters,
//! deadlines and end state) inside a ticket that owns the stream, and takes
//! the cap slots (or refuses the stream). It then inserts a
//! [`StreamHandle`](crate::StreamHandle) on the record into the request
//! extensions, wraps the request body in a [`RequestBody`], calls your
//! service and files the stream with the layer's timer. The ticket moves
//! into the [`ResponseFuture`], and from there into the [`ResponseBody`].
//!
//! While the stream is open, each body notes its frames in the record; the
//! timer (one sweeper task per layer) checks deadlines every resolution and
//! ends streams whose deadline passed. Every end, whoever makes it (the
//! response body at its last frame, the timer, a drain, the handle's
//! [`cancel`](crate::StreamHandle::cancel), a drop, a panic), is decided by
//! one compare-and-swap on the record, so exactly one wins, and is finished
//! once: the bodies and the handle's waiters are woken, the timer entry and
//! cap slots go back, the counters are bumped and the end event is emitted.
//! Whatever becomes of the ticket's last holder, dropping it ends the stream
//! if nothing else has.
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//!
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{Layer, ServiceExt};
//! use tower_stream_guard::{BoxError, EndReason, StreamGuardLayer, StreamHandle, stream::RequestBody};
//!
//! # fn main() -> Result<(), BoxError> {
//! let runtime = tokio::runtime::Runtime::new()?;
//! runtime.block_on(async {
//!     let guard = StreamGuardLayer::builder()
//!         .idle_timeout(Duration::from_secs(30))
//!         .build()?;
//!     let mut events = guard.subscribe();
//!     let service = guard.layer(tower::service_fn(
//!         |request: Request<RequestBody<Full<Bytes>>>| async move {
//!             let handle = request.extensions().get::<StreamHandle>().cloned();
//!             assert!(handle.is_some_and(|handle| !handle.is_ended()));
//!             Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello"))))
//!         },
//!     ));
//!
//!     let response = service.oneshot(Request::new(Full::new(Bytes::new()))).await?;
//!     let body = response.into_body().collect().await?.to_bytes();
//!     assert_eq!(body, "hello");
//!
//!     // The body's last frame ended the stream: its one event is out.
//!     let event = events.recv().await?;
//!     assert_eq!(event.reason(), EndReason::Completed);
//!     assert_eq!(event.response().bytes, 5);
//!     Ok::<_, BoxError>(())
//! })
//! # }
//! ```
//!
//! # Costs
//!
//! - Per data frame: no timer, no lock, no allocation and no clock read; an
//!   atomic load (has the stream ended?) and a few relaxed stores (frame and
//!   byte counts, the coarse time of the last frame).
//! - Per stream: one allocation for its record (264 bytes), one insertion
//!   into a shard of the layer's timer map and one removal (more for a
//!   stream that keeps going idle and active), a short lock at its end, and
//!   a short lock per keyed cap set (per connection, per peer) on the way in
//!   and out. More allocations only where a stream has more to keep: a
//!   connection key and peer that no
//!   [`ConnectionGuard`](crate::ConnectionGuard)'s handle gives (64 bytes
//!   for tonic's or axum's connect info, about 128 for other keys, peers or
//!   methods), cap slots or a cap's refusal (a small box), a waiter on
//!   [`StreamHandle::cancelled`](crate::StreamHandle::cancelled) (that box
//!   and the waiters' `Notify`). The request's extensions get the
//!   [`StreamHandle`](crate::StreamHandle) (an allocation for a request that
//!   had no extensions).
//! - Per layer: one timer task, which wakes every
//!   [`timer_resolution`](crate::StreamGuardBuilder::timer_resolution)
//!   (10 ms by default) while the layer has streams with a time limit (or
//!   a drain's deadline) and exits when it has none.
//!
//! # Cancel safety
//!
//! - Dropping the [`ResponseFuture`] before it resolves ends the stream as
//!   [`EndReason::Cancelled`](crate::EndReason::Cancelled) and drops your
//!   service's future with it.
//! - Dropping a [`ResponseBody`] before its end ends the stream as
//!   [`EndReason::Cancelled`](crate::EndReason::Cancelled) (hyper does so
//!   when the peer resets the stream or the connection goes away).
//! - The futures returned by
//!   [`StreamHandle::cancelled`](crate::StreamHandle::cancelled),
//!   [`run_until_cancelled`](crate::StreamHandle::run_until_cancelled) and
//!   [`draining`](crate::StreamHandle::draining) own what they need;
//!   dropping one cancels nothing else (dropping `run_until_cancelled`'s
//!   drops the future it runs).

mod admission;
pub(crate) mod builder;
mod cap;
mod cap_wait;
mod ending;
mod framing;
mod future;
pub(crate) mod handle;
pub(crate) mod heartbeat;
mod last_word;
mod late;
pub(crate) mod layer;
#[cfg(all(test, stream_guard_loom))]
mod loom_last_word;
#[cfg(all(test, stream_guard_loom))]
mod loom_tests;
#[cfg(feature = "metrics")]
mod metering;
mod origin;
mod policy;
mod rate;
mod record;
pub(crate) mod report;
mod request_body;
mod response_body;
pub(crate) mod route;
mod service;
mod shared;
mod takeover;
mod ticket;
mod timer;
#[cfg(feature = "test-view")]
mod view;

pub use future::ResponseFuture;
pub use policy::Policy;
pub use request_body::RequestBody;
pub use response_body::ResponseBody;
#[cfg(feature = "tonic")]
pub use service::TonicBody;
pub use service::{PlainBody, StreamGuard, WrapRequestBody};
