//! Hostile inputs: whatever a peer puts in a path, a method or a
//! `grpc-timeout` header, and whatever a user puts in the configuration, the
//! guard neither panics nor writes a broken `grpc-message` or JSON line; a
//! panicking or absent-minded event subscriber never holds up a stream; a
//! flood of streams opened and reset at once leaves nothing behind.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, uri::PathAndQuery};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proptest::prelude::*;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::broadcast::error::TryRecvError,
};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_stream_guard::{
    ConfigError, ConnectionGuard, ConnectionKey, Drain, EndReason, GuardError, IdleDirection,
    PeerAddr, RoutePolicy, StreamGuardLayer,
};

/// The largest event capacity the guards accept (documented: 65,536).
const MAX_EVENT_CAPACITY: usize = 1 << 16;
/// The longest duration the guards accept (documented: 365 days).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

#[allow(dead_code)]
#[path = "../../tests/support/mod.rs"]
mod support;
use support::{wait_for_no_tasks, wait_until};

/// A response body that never yields: the stream stays open until a guard
/// or the peer ends it.
struct Pending;

impl Body for Pending {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// Decodes a `grpc-message` value; `None` if it is not the spec's
/// percent-encoding of UTF-8 in visible ASCII.
fn percent_decode(value: &[u8]) -> Option<String> {
    let mut out = Vec::new();
    let mut bytes = value.iter();
    while let Some(&b) = bytes.next() {
        if !(0x20..=0x7e).contains(&b) {
            return None;
        }
        if b == b'%' {
            let hex = [*bytes.next()?, *bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// Characters a peer can get into a request path, and some it cannot.
fn path_text() -> impl Strategy<Value = String> {
    let chars = prop_oneof![
        4 => proptest::char::range('!', '~'),
        1 => Just('"'),
        1 => Just('\\'),
        1 => proptest::char::range('\u{80}', '\u{10ffff}'),
        1 => proptest::char::range('\0', ' '),
    ];
    proptest::collection::vec(chars, 0..40).prop_map(|chars| chars.into_iter().collect())
}

/// Characters of an extension method token, and some that are not.
fn method_text() -> impl Strategy<Value = String> {
    let chars = prop_oneof![
        4 => proptest::char::range('A', 'Z'),
        2 => proptest::sample::select(vec!['!', '#', '$', '%', '&', '\'', '*', '+', '-', '.', '^', '_', '`', '|', '~']),
        1 => proptest::char::range('\0', '\u{ff}'),
    ];
    proptest::collection::vec(chars, 1..12).prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any path and method a peer can send comes out of the JSON event line
    /// as valid JSON holding exactly that path and method, on one line.
    #[test]
    fn event_json_survives_any_path_and_method(path in path_text(), method in method_text()) {
        let Ok(path) = PathAndQuery::try_from(format!("/{path}")) else {
            return Ok(());
        };
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Ok(());
        };
        let runtime = paused_runtime();
        let event = runtime.block_on(async {
            let guard = StreamGuardLayer::builder()
                .idle_timeout(Duration::from_secs(1))
                .build()
                .expect("valid configuration");
            let mut events = guard.subscribe();
            let service = guard.layer(service_fn(|_: Request<_>| async {
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }));
            let request = Request::builder()
                .method(method.clone())
                .uri(path.clone())
                .body(Empty::<Bytes>::new())
                .expect("request");
            let response = service.oneshot(request).await.expect("response");
            drop(response);
            events.try_recv().expect("one end event")
        });
        prop_assert_eq!(event.path(), path.path());
        let line = event.to_json();
        prop_assert!(!line.contains('\n'), "{}", line);
        let json: serde_json::Value = serde_json::from_str(&line)
            .map_err(|err| TestCaseError::fail(format!("{err}: {line}")))?;
        prop_assert_eq!(json["route"].as_str(), Some(path.path()));
        prop_assert_eq!(json["method"].as_str(), Some(method.as_str()));
        prop_assert_eq!(json["reason"].as_str(), Some("completed"));
    }

    /// Whatever a client puts in `grpc-timeout`, and whatever the path, the
    /// guard does not panic, and the stream ends by the lifetime or the
    /// client's deadline (whichever is shorter) with a `grpc-message` that is
    /// visible ASCII, percent-decodes to UTF-8 and names the limit.
    #[test]
    fn grpc_message_survives_any_path_and_grpc_timeout(
        path in path_text(),
        timeout in proptest::collection::vec(any::<u8>(), 0..12),
        well_formed in proptest::option::of((1u32..400, proptest::sample::select(vec!['m', 'u', 'n', 'S']))),
    ) {
        let Ok(path) = PathAndQuery::try_from(format!("/{path}")) else {
            return Ok(());
        };
        let header = match well_formed {
            Some((amount, unit)) => HeaderValue::from_str(&format!("{amount}{unit}")).ok(),
            None => HeaderValue::from_bytes(&timeout).ok(),
        };
        let lifetime = Duration::from_millis(300);
        let runtime = paused_runtime();
        let (message, reason) = runtime.block_on(async {
            let guard = StreamGuardLayer::builder()
                .max_lifetime(lifetime)
                .honor_grpc_timeout(true)
                .build()
                .expect("valid configuration");
            let mut events = guard.subscribe();
            let service = guard.layer(service_fn(|_: Request<_>| async {
                Ok::<_, Infallible>(Response::builder()
                    .header("content-type", "application/grpc")
                    .body(Pending)
                    .expect("response"))
            }));
            let mut request = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header("content-type", "application/grpc")
                .body(Empty::<Bytes>::new())
                .expect("request");
            if let Some(header) = header {
                request.headers_mut().insert("grpc-timeout", header);
            }
            let response = service.oneshot(request).await.expect("response");
            let message = if response.headers().contains_key("grpc-status") {
                // The client's deadline was too short even for headers.
                response.headers().get("grpc-message").cloned()
            } else {
                let trailers = tokio::time::timeout(
                    lifetime * 2,
                    response.into_body().collect(),
                )
                .await
                .expect("the lifetime ends the stream")
                .expect("gRPC bodies end with trailers")
                .trailers()
                .cloned()
                .expect("trailers");
                trailers.get("grpc-message").cloned()
            };
            let event = events.recv().await.expect("one end event");
            (message, event.reason())
        });
        prop_assert_eq!(reason, EndReason::LifetimeExceeded);
        let message = message.expect("a grpc-message");
        let text = percent_decode(message.as_bytes());
        prop_assert!(text.is_some(), "not percent-encoded UTF-8: {:?}", message);
        let text = text.unwrap_or_default();
        prop_assert!(
            text.contains("(max_lifetime)") || text.contains("(grpc-timeout)"),
            "{}", text
        );
    }
}

#[test]
fn absurd_configuration_is_refused_when_built() {
    let err = |builder: tower_stream_guard::StreamGuardBuilder| {
        builder
            .build()
            .expect_err("this configuration must be refused")
    };
    let base = || StreamGuardLayer::builder().idle_timeout(Duration::from_secs(1));

    assert_eq!(
        err(base().event_capacity(usize::MAX)),
        ConfigError::EventCapacityTooLarge { value: usize::MAX }
    );
    assert_eq!(
        err(base().event_capacity(MAX_EVENT_CAPACITY + 1)),
        ConfigError::EventCapacityTooLarge {
            value: MAX_EVENT_CAPACITY + 1
        }
    );
    assert!(base().event_capacity(MAX_EVENT_CAPACITY).build().is_ok());
    assert_eq!(
        err(base().event_capacity(0)),
        ConfigError::ZeroEventCapacity
    );
    for setting in [
        StreamGuardLayer::builder().idle_timeout(Duration::MAX),
        StreamGuardLayer::builder().request_idle_timeout(Duration::MAX),
        StreamGuardLayer::builder().response_idle_timeout(Duration::MAX),
        StreamGuardLayer::builder().max_lifetime(Duration::MAX),
        base().cap_wait(Duration::MAX),
    ] {
        assert!(matches!(err(setting), ConfigError::TooLong { .. }));
    }
    assert!(matches!(
        err(base().timer_resolution(Duration::MAX)),
        ConfigError::ResolutionOutOfRange { .. }
    ));
    assert!(matches!(
        err(base().timer_resolution(Duration::ZERO)),
        ConfigError::ResolutionOutOfRange { .. }
    ));
    assert!(matches!(
        err(base().max_streams(0)),
        ConfigError::ZeroCap { .. }
    ));
    assert!(matches!(
        err(base().route("/a.A/B", RoutePolicy::new().max_lifetime(Duration::MAX))),
        ConfigError::Route { .. }
    ));
    assert!(matches!(
        err(base().route("no-slash", RoutePolicy::new())),
        ConfigError::InvalidRoute { .. }
    ));
    assert!(matches!(
        err(base().idle_timeout(Duration::MAX)),
        ConfigError::TooLong { .. }
    ));
    assert!(matches!(
        err(base().max_lifetime(Duration::ZERO)),
        ConfigError::Zero { .. }
    ));
    // Huge caps are fine: they mean "no practical limit".
    assert!(base().max_streams(usize::MAX).build().is_ok());

    let conn = |builder: tower_stream_guard::ConnectionGuardBuilder| {
        builder.build().expect_err("must be refused")
    };
    assert_eq!(
        conn(ConnectionGuard::builder().event_capacity(usize::MAX)),
        ConfigError::EventCapacityTooLarge { value: usize::MAX }
    );
    // Each guard's error names its own setting.
    let wrong = conn(ConnectionGuard::builder().resolution(Duration::from_secs(5)));
    assert_eq!(
        wrong,
        ConfigError::ResolutionOutOfRange {
            setting: "resolution",
            value: Duration::from_secs(5)
        }
    );
    assert!(
        wrong.to_string().starts_with("`resolution` is 5s"),
        "{wrong}"
    );
    assert!(
        err(base().timer_resolution(Duration::ZERO))
            .to_string()
            .starts_with("`timer_resolution` is 0ns")
    );
    assert!(matches!(
        conn(ConnectionGuard::builder().idle_timeout(Duration::MAX)),
        ConfigError::TooLong { .. }
    ));
    assert!(matches!(
        conn(ConnectionGuard::builder().max_age(Duration::MAX)),
        ConfigError::TooLong { .. }
    ));
    // Every error explains itself in one line.
    for error in [
        ConfigError::EventCapacityTooLarge { value: usize::MAX },
        ConfigError::ZeroEventCapacity,
    ] {
        let text = error.to_string();
        assert!(!text.is_empty() && !text.contains('\n'), "{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_drain_with_an_absurd_grace_neither_panics_nor_cuts_early() {
    let drain = Drain::with_close_delay(Duration::MAX);
    let guard = StreamGuardLayer::builder()
        .drain(&drain)
        .build()
        .expect("valid configuration");
    let service = guard.layer(service_fn(|_: Request<_>| async {
        Ok::<_, Infallible>(Response::new(Pending))
    }));
    let response = service
        .oneshot(Request::new(Empty::<Bytes>::new()))
        .await
        .expect("response");
    let report = drain.start(Duration::MAX);
    assert!(drain.is_draining());
    // (The guard's timer ticks every 10 ms while the stream is open: a minute
    // of paused time is 6,000 ticks.)
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(guard.active_streams(), 1, "cut long before the grace");
    drop(response);
    // With the stream gone, the drain reports at once.
    let report = tokio::time::timeout(Duration::from_secs(1), report)
        .await
        .expect("the drain finishes once no stream is left");
    assert_eq!(report.cut(), 0);
    assert!(MAX_DURATION < Duration::MAX);
}

/// A subscriber that panics on every event, and one that never reads its
/// receiver: streams still end normally, the other subscribers still hear of
/// every end, and the counters agree.
#[tokio::test(start_paused = true)]
async fn panicking_and_absent_subscribers_never_hold_up_a_stream() {
    let heard = Arc::new(AtomicUsize::new(0));
    let guard = {
        let heard = Arc::clone(&heard);
        StreamGuardLayer::builder()
            .response_idle_timeout(Duration::from_millis(100))
            .event_capacity(1)
            .on_end(|event| panic!("subscriber bug on stream {}", event.id().get()))
            .on_end(move |_| {
                heard.fetch_add(1, Ordering::SeqCst);
            })
            .build()
            .expect("valid configuration")
    };
    // Subscribed and never read: it lags, nobody waits for it.
    let mut absent = guard.subscribe();
    let mut service = guard.layer(service_fn(|request: Request<_>| async move {
        Ok::<_, Infallible>(if request.uri().path() == "/pending" {
            Response::new(http_body_util::Either::Left(Pending))
        } else {
            Response::new(http_body_util::Either::Right(Empty::<Bytes>::new()))
        })
    }));
    let mut idle = Vec::new();
    for i in 0..100 {
        let path = if i % 2 == 0 { "/pending" } else { "/done" };
        let request = Request::builder()
            .uri(path)
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("response");
        idle.push(response);
    }
    // The idle half is ended by the timer, whose task must survive the
    // panicking callback.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(guard.active_streams(), 0);
    assert_eq!(heard.load(Ordering::SeqCst), 100);
    let stats = guard.stats();
    assert_eq!(stats.ended(EndReason::Completed), 50);
    assert_eq!(
        stats.ended(EndReason::IdleTimeout(IdleDirection::Response)),
        50
    );
    assert!(matches!(absent.try_recv(), Err(TryRecvError::Lagged(99))));
    for (i, response) in idle.into_iter().enumerate() {
        let body = response.into_body().collect().await;
        if i % 2 == 0 {
            // Idle streams end with the guard's error, naming the limit.
            let error = body.expect_err("an idle stream's body ends with an error");
            let error = error
                .downcast_ref::<GuardError>()
                .unwrap_or_else(|| panic!("stream {i}: not the guard's error: {error}"));
            assert_eq!(
                error.reason(),
                EndReason::IdleTimeout(IdleDirection::Response),
                "stream {i}"
            );
            assert_eq!(error.limit(), Duration::from_millis(100), "stream {i}");
            assert!(
                error.to_string().contains("response_idle_timeout"),
                "stream {i}: {error}"
            );
        } else {
            // Finished streams are empty and end cleanly.
            let body = body.unwrap_or_else(|error| panic!("stream {i}: {error}"));
            assert!(body.trailers().is_none(), "stream {i}");
            assert!(body.to_bytes().is_empty(), "stream {i}");
        }
    }
}

/// Awaits a task: its panic fails the test (with its own message); being
/// aborted or cancelled does not.
async fn joined<T>(task: tokio::task::JoinHandle<T>) {
    if let Err(error) = task.await
        && error.is_panic()
    {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// Streams opened and reset at once, in waves, over one HTTP/2 connection
/// (the "rapid reset" pattern): afterwards nothing is active, every stream
/// the server saw had exactly one end, every cap slot and connection entry
/// is back, and no task is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_leaves_nothing_behind() {
    const WAVES: usize = 10;
    const PER_WAVE: usize = 150;
    let seen = Arc::new(AtomicUsize::new(0));
    let ends = Arc::new(AtomicUsize::new(0));
    let guard = {
        let ends = Arc::clone(&ends);
        StreamGuardLayer::builder()
            .idle_timeout(Duration::from_secs(60))
            .max_streams_per_connection(10_000)
            .max_streams_per_peer(10_000)
            .max_streams(10_000)
            .on_end(move |_| {
                ends.fetch_add(1, Ordering::SeqCst);
            })
            .build()
            .expect("valid configuration")
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = {
        let (guard, seen) = (guard.clone(), Arc::clone(&seen));
        tokio::spawn(async move {
            let (tcp, peer) = listener.accept().await.expect("accept");
            // Built per connection: say which one, for the per-connection cap.
            let guarded = guard
                .layer(service_fn(move |_: Request<_>| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
                }))
                .for_connection(ConnectionKey::from_remote(peer));
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(PeerAddr(peer));
                guarded.clone().oneshot(request)
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(1000)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        })
    };
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("handshake");
    let client = tokio::spawn(connection);

    for wave in 0..WAVES {
        let before = seen.load(Ordering::SeqCst);
        let calls: Vec<_> = (0..PER_WAVE)
            .map(|i| {
                let mut sender = sender.clone();
                tokio::spawn(async move {
                    let request = Request::builder()
                        .uri(format!("http://{addr}/flood/{wave}/{i}"))
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    let _ = sender.send_request(request).await;
                })
            })
            .collect();
        // Wait until the server sees (most of) the wave, then reset them all.
        wait_until("the server sees the wave", || {
            seen.load(Ordering::SeqCst) >= before + PER_WAVE * 9 / 10
        })
        .await;
        calls.iter().for_each(|call| call.abort());
        for call in calls {
            joined(call).await;
        }
    }
    wait_until("every reset stream has ended", || {
        guard.active_streams() == 0
    })
    .await;
    let seen = seen.load(Ordering::SeqCst);
    eprintln!("rapid reset: {seen} streams seen and reset");
    assert!(
        seen >= WAVES * PER_WAVE * 9 / 10,
        "only {seen} streams seen"
    );
    assert_eq!(ends.load(Ordering::SeqCst), seen, "one end per stream seen");
    let stats = guard.stats();
    assert_eq!(stats.ended(EndReason::Cancelled), seen as u64);
    assert_eq!(stats.active(), 0);
    assert!(guard.connection_streams().is_empty());
    assert!(guard.peer_streams().is_empty());

    drop(sender);
    client.abort();
    tokio::time::timeout(support::PATIENCE, joined(server))
        .await
        .expect("the server task ends once the client is gone");
    wait_for_no_tasks().await;
}
