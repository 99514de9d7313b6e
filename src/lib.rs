//! Tower middleware that stops long-lived HTTP/2 streams from leaking.
//!
//! gRPC streaming calls, server-sent events and long polls leak when one side
//! goes quiet or vanishes: a server's receive loop blocks for hours after a
//! client's network dropped, a producer task runs on after its client left, a
//! client that stopped reading pins a stream forever. This crate wraps request
//! and response bodies to enforce, per stream:
//!
//! - **idle timeouts**: no frame moved for a while, on the request side, the
//!   response side, or both ([`IdleDirection`]); keep-alive frames a
//!   service sends (SSE comments, ping messages) can be told not to count
//!   ([`Heartbeat`]);
//! - a **maximum lifetime**, from the moment the request reached the guard
//!   (optionally shortened by the client's `grpc-timeout`);
//! - a **minimum response rate** for readers that trickle: fewer than N bytes
//!   over a window of time the response waited on its peer ends the stream
//!   ([`min_response_rate`](StreamGuardBuilder::min_response_rate),
//!   [`EndReason::SlowReader`]); every end event reports that waiting time
//!   ([`EndEvent::blocked_on_reader`]);
//! - **stream caps** per connection, per peer and in total, whose slots are
//!   held until the stream really ends ([`StreamCap`]);
//! - different limits per route ([`RoutePolicy`]);
//!
//! and gives every stream
//!
//! - a [`StreamHandle`] in the request extensions, whose
//!   [`cancelled()`](StreamHandle::cancelled) resolves when the stream ends
//!   for any reason, and whose
//!   [`run_until_cancelled`](StreamHandle::run_until_cancelled) stops a
//!   producer then: the disconnect callback tonic lacks;
//! - exactly one [`EndEvent`]: why it ended, how long it lived, what it moved;
//!   and a cheap snapshot of counters, [`StreamGuardLayer::stats`].
//!
//! and bounds shutdown and connections:
//!
//! - a [`Drain`] gives graceful shutdown a deadline and handlers a
//!   [`draining`](StreamHandle::draining) notice;
//! - a [`ConnectionGuard`] gives each accepted connection an id and closes
//!   the ones hyper would keep forever (peers that stopped reading, idle or
//!   over-age connections).
//!
//! # Quick start (tonic)
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_stream_guard::StreamGuardLayer;
//!
//! # async fn run(router: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
//! let guard = StreamGuardLayer::builder()
//!     .idle_timeout(Duration::from_secs(30))
//!     .max_lifetime(Duration::from_secs(30 * 60))
//!     .build()?;
//! let mut events = guard.subscribe();
//! tokio::spawn(async move {
//!     while let Ok(event) = events.recv().await {
//!         println!("{}", event.to_json());
//!     }
//! });
//! tonic::transport::Server::builder()
//!     .layer(guard)
//!     .add_routes(router)
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Quick start (axum)
//!
//! A server-sent-events route whose producer stops the moment its stream
//! ends; with the `axum` feature, the guard reads the peer from axum's
//! `ConnectInfo` for the per-peer cap. The cap is the route's: a layer-wide
//! cap would count every request, health checks too.
//!
//! ```no_run
//! use std::{convert::Infallible, net::SocketAddr, time::Duration};
//!
//! use axum::{
//!     Extension, Router,
//!     response::sse::{Event, Sse},
//!     routing::get,
//! };
//! use tokio_stream::wrappers::ReceiverStream;
//! use tower_stream_guard::{RoutePolicy, StreamGuardLayer, StreamHandle};
//!
//! async fn events(
//!     Extension(handle): Extension<StreamHandle>,
//! ) -> Sse<ReceiverStream<Result<Event, Infallible>>> {
//!     let (tx, rx) = tokio::sync::mpsc::channel(16);
//!     tokio::spawn(async move {
//!         // The whole loop stops when the stream ends, even inside `send`.
//!         let produce = async move {
//!             for n in 0u64.. {
//!                 let event = Event::default().data(n.to_string());
//!                 if tx.send(Ok(event)).await.is_err() {
//!                     return;
//!                 }
//!                 tokio::time::sleep(Duration::from_secs(1)).await;
//!             }
//!         };
//!         handle.run_until_cancelled(produce).await;
//!     });
//!     Sse::new(ReceiverStream::new(rx))
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let guard = StreamGuardLayer::builder()
//!     .response_idle_timeout(Duration::from_secs(30))
//!     .route("/events", RoutePolicy::new().max_streams_per_peer(8))
//!     .build()?;
//! let app = Router::new().route("/events", get(events)).layer(guard);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(
//!     listener,
//!     app.into_make_service_with_connect_info::<SocketAddr>(),
//! )
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! A tonic client `Channel` takes exactly `tonic::body::Body`: guard it with
//! [`StreamGuardLayer::for_tonic_channel`]. Servers need no adapter.
//!
//! # What happens when a guard fires
//!
//! | situation | gRPC response | plain HTTP response |
//! |---|---|---|
//! | response body being polled | ends with trailers `grpc-status: 4` and a `grpc-message` naming the guard | body error: hyper resets the stream (`RST_STREAM(CANCEL)` on HTTP/2) |
//! | before response headers (handler still running) | trailers-only response, `grpc-status: 4`; the handler's future is dropped | `408 Request Timeout` when the request body went silent ([`request_idle_timeout`](StreamGuardBuilder::request_idle_timeout)), `504 Gateway Timeout` for the other idle timeouts and the lifetime; the handler's future is dropped |
//! | the handler answers, or the body produces its last part, as it fires | the answer (nothing after its head) or the last part (data frame, trailers) is dropped: the peer reads the guard's status, as in the rows above | `504`/`408` instead of an answer with nothing after its head; a body error instead of the last data frame or last declared byte |
//! | a cap refuses the stream, or a drain is in progress | trailers-only response, `grpc-status: 8` (cap) or `14` (drain) | `503 Service Unavailable` with `Retry-After: 1` ([`retry_after`](StreamGuardBuilder::retry_after)) |
//! | peer reads too slowly ([`min_response_rate`](StreamGuardBuilder::min_response_rate)) | trailers `grpc-status: 8` (RESOURCE_EXHAUSTED) naming the setting, sent if the peer reads on; released at once, as below | body error: hyper resets the stream |
//! | peer stopped reading (hyper no longer polls the body) | handle cancelled, event emitted, state released at once; the trailers go out if the peer ever reads again | same |
//! | request body awaited by the handler | the read fails with [`GuardError`]; tonic handlers see `Status::deadline_exceeded` from `message()` | the read fails with [`GuardError`] |
//!
//! In every case the [`StreamHandle`] is cancelled and the end event is
//! emitted when the guard fires. Whatever the guard writes itself (trailers,
//! a trailers-only or plain response) also carries a `stream-guard-reason`
//! header or trailer: [`EndReason::as_str`] of the end (`idle_timeout`,
//! `lifetime_exceeded`, `rejected`, `drained`, `slow_reader`, `cancelled`), so that a
//! client tells the guard's `DEADLINE_EXCEEDED` from the server's own; a
//! guard on the client reports it as [`EndEvent::server_guard_reason`]. What stays with hyper after a stalled reader
//! is released, until the peer reads, resets the stream or the connection
//! closes: the HTTP/2 stream and its unsent buffered data (at most the
//! flow-control window), and the response body, with the inner body it wraps
//! and whatever feeds that (a handler's channel and its buffered items). A
//! producer blocked on `send` into such a channel is stuck until then, unless
//! its whole loop, the `send` included, runs under
//! [`StreamHandle::run_until_cancelled`]: that is what the handle is for.
//!
//! # Costs
//!
//! Per data frame: no timer, no lock, no allocation, no clock read; an atomic
//! load and a few relaxed stores. Per stream: one allocation for its shared
//! record, one insertion into the guard's timer map and one removal (plus one
//! more of each per idle period), and, only with keyed caps or
//! `track_connections`, a short lock of the cap set's counts on the way in
//! and out. Per guard: one timer
//! task that wakes every [`timer_resolution`](StreamGuardBuilder::timer_resolution)
//! (10 ms) while it has streams and exits when it has none. Deadlines fire at
//! most one resolution late (idle timeouts two) after the timer task gets to
//! run, and never more than a quarter resolution plus a millisecond early:
//! when a runtime is so busy that a tick runs later than that, frames that
//! moved during the delay still count as recent (the guard remembers its
//! last 4,096 such ticks). The runtime needs its time driver (`enable_time`,
//! on by default with `#[tokio::main]`).
//!
//! # How it is built
//!
//! A stream's life, from [`StreamGuardLayer`]'s service to its end event:
//!
//! 1. The service's `call` ([`stream::StreamGuard`]) picks the
//!    request's route, finds where it came from (its connection and peer,
//!    from extensions the server filled in), creates the stream's record
//!    inside a *ticket* (the one value that owns the stream: its `Drop`
//!    ends it), refuses it if a drain is in progress or a cap is full, puts
//!    a [`StreamHandle`] into the request extensions, wraps the request body
//!    and files the stream with the layer's timer.
//! 2. The [`stream::ResponseFuture`] holds the ticket while the service
//!    answers; if the stream ends first it answers for the guard (trailers
//!    only, or `408`/`504`/`503`). Its answer's body, a [`stream::ResponseBody`],
//!    takes the ticket over; or, for an HTTP/1.1 upgrade (a `101`) on a
//!    guarded connection, the connection guard's record of the connection
//!    does, and the connection's close ends the stream
//!    (`stream/takeover.rs`).
//! 3. The bodies count frames and stamp the time of the last one with the
//!    timer's coarse clock: that is all they do per frame. **Idle timeouts
//!    and the maximum lifetime are enforced by the timer** (one task per
//!    layer, waking each resolution while the layer has streams), which
//!    finds streams whose deadline passed and ends them; **caps** when the
//!    stream starts (slots held until it ends); the **drain** by moving
//!    every stream's deadline to the end of its grace.
//! 4. An end, whoever makes it (the timer, a body's last frame or error, a
//!    dropped ticket, [`StreamHandle::cancel`], a panic), is decided by one
//!    compare-and-swap of the record's phase, so it happens once. The
//!    service's last part (an answer with nothing after its head, the
//!    body's last frame or declared byte, its trailers) takes that
//!    compare-and-swap before it goes out, and gives way to the guard's
//!    ending when it loses (`stream/last_word.rs`): what the peer reads
//!    last is what the event says. Then the
//!    stream's wakers fire (a guard-ended body yields its trailers or
//!    error, a handler's `cancelled()` resolves), its timer filing and cap
//!    slots are released, its connection's counts settle, its one
//!    [`EndEvent`] goes to counters, logs and subscribers, and last a drain
//!    in progress is told (it counts the streams still active).
//!
//! The [`ConnectionGuard`] works a level below, on the accepted IO: it
//! fails reads and writes of connections it closes, which makes hyper drop
//! them. In the source, `src/stream/` holds the stream guard, one file per
//! step above; `src/connection/` the connection guard; small leaf modules
//! (endings, errors, peers, events, gRPC endings, JSON lines, sync helpers)
//! serve both, and `src/drain/` reaches both through a small trait. The
//! table of ways a stream can end, with each one's gRPC status and message,
//! is `src/end.rs`.
//!
//! # Features
//!
//! - `tonic` (default): `tonic::Status` inside [`GuardError`], peer
//!   addresses from tonic's `TcpConnectInfo`, tonic's `Connected` for
//!   [`connection::GuardedIo`], and [`StreamGuardLayer::for_tonic_channel`]
//!   for a tonic client `Channel`.
//! - `hyper`: [`ConnectionGuard::serve_connection`], which drives accepted
//!   connections with hyper-util and sends GOAWAY at their maximum age and
//!   when a drain begins.
//! - `tls`: connections under TLS: tonic's `TlsConnectInfo` (its own
//!   `tls_config`, or your own rustls acceptor feeding
//!   `serve_with_incoming`) gives connection keys and peers, in either
//!   nesting with a [`ConnectionGuard`]; [`connection::PeerOf`] for
//!   `tokio_rustls::server::TlsStream`. Adds tokio-rustls without a crypto
//!   provider.
//! - `axum`: axum's `ConnectInfo<SocketAddr>` gives connection keys and peers;
//!   [`ConnectionGuard::wrap_listener`] guards the connections `axum::serve`
//!   accepts (see [`connection::GuardedListener`]).
//! - `metrics`: stream and connection metrics through the
//!   [`metrics`](https://docs.rs/metrics) facade, for any exporter
//!   (Prometheus, OpenTelemetry, ...), switched on with
//!   `StreamGuardBuilder::metrics(true)` and
//!   `ConnectionGuardBuilder::metrics(true)`. Recorded when a stream or
//!   connection starts and ends, never per frame; `route` labels are
//!   route names, up to `max_path_labels` (default 256) gRPC methods the
//!   service accepted, or `other`: bounded whatever peers send.
//!
//! [`ConnectionKey`] lists everything the guard reads to tell connections
//! apart; a per-connection or per-peer cap refuses a stream it cannot place
//! rather than share one slot pool across the server.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub, missing_debug_implementations)]

pub mod connection;
mod drain;
#[cfg(test)]
mod draw;
mod end;
mod error;
mod events;
mod frames;
mod grpc;
mod json;
mod meter;
mod peer;
mod socket;
mod stats;
mod status;
pub mod stream;
mod sync;
mod ticker;
#[cfg(feature = "test-view")]
mod view;

pub use connection::{
    builder::ConnectionGuardBuilder,
    event::{ConnectionEnd, ConnectionEvent},
    guard::ConnectionGuard,
    handle::ConnectionHandle,
};
pub use drain::{Drain, DrainReport};
pub use end::{EndReason, IdleDirection, StreamCap};
pub use error::{BoxError, ConfigError, GuardError};
pub use events::{EndEvent, StreamId, Traffic};
pub use peer::{ConnectionKey, PeerAddr};
pub use stats::GuardStats;
pub use stream::{
    builder::StreamGuardBuilder,
    handle::StreamHandle,
    heartbeat::Heartbeat,
    layer::StreamGuardLayer,
    route::{RoutePolicy, RouteRequest},
};
#[cfg(feature = "test-view")]
#[doc(hidden)]
pub use view::{ConnectionHoldings, Holdings};

// The README's examples are compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
