//! Slow readers under paused time: the time a response waits on its reader
//! (`EndEvent::blocked_on_reader`), and `min_response_rate`, which ends a
//! stream whose reader moves too few bytes while the body has data for it.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use tokio::time::{Instant, sleep};
use tower::{Layer, ServiceExt};
use tower_stream_guard::{
    EndReason, IdleDirection, StreamGuardLayer,
    stream::{RequestBody, ResponseBody},
};

#[path = "support/paused.rs"]
mod paused;
use paused::{SECOND, TICK, guard, next_event};

/// Bytes in each frame of [`Endless`].
const FRAME: usize = 10;

/// What the response body of a stream does.
#[derive(Clone, Copy)]
enum Producer {
    /// Always has a frame of [`FRAME`] bytes ready: whatever is slow is the
    /// reader.
    Endless,
    /// One frame, then nothing, for ever: a producer with nothing to send.
    OneThenNothing,
}

struct Produced {
    producer: Producer,
    sent: u64,
}

impl Body for Produced {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.producer {
            Producer::OneThenNothing if self.sent > 0 => Poll::Pending,
            _ => {
                self.sent += 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[7; FRAME])))))
            }
        }
    }
}

/// Opens a stream whose response body is `producer`'s, and returns its body
/// unread.
async fn open(guard: &StreamGuardLayer, producer: Producer) -> ResponseBody<Produced> {
    let service = guard.layer(tower::service_fn(
        move |_: Request<RequestBody<Empty<Bytes>>>| async move {
            Ok::<_, Infallible>(http::Response::new(Produced { producer, sent: 0 }))
        },
    ));
    let request = Request::get("/feed").body(Empty::new()).unwrap();
    service.oneshot(request).await.unwrap().into_body()
}

/// Reads one frame, which must be there at once (the body is polled as
/// hyper polls it when the peer has room).
async fn read_one(body: &mut ResponseBody<Produced>) -> usize {
    let frame = tokio::time::timeout(Duration::ZERO, body.frame())
        .await
        .expect("a frame ready")
        .expect("not at its end")
        .expect("no error");
    frame.into_data().expect("data").len()
}

/// Polls the body once, as hyper does when it has room: nothing is ready.
async fn poll_nothing(body: &mut ResponseBody<Produced>) {
    let polled = tokio::time::timeout(Duration::ZERO, body.frame()).await;
    assert!(polled.is_err(), "nothing to read");
}

fn within_a_tick(measured: Duration, truth: Duration) {
    let diff = measured.abs_diff(truth);
    assert!(diff <= TICK, "measured {measured:?}, truth {truth:?}");
}

#[tokio::test(start_paused = true)]
async fn a_frame_left_unread_for_three_seconds_counts_as_blocked_within_a_tick() {
    let guard = guard(StreamGuardLayer::builder().max_lifetime(3600 * SECOND));
    let mut events = guard.subscribe();
    let mut body = open(&guard, Producer::Endless).await;
    read_one(&mut body).await;
    // The next frame is ready; the reader takes 3 s to come back for it.
    sleep(3 * SECOND).await;
    read_one(&mut body).await;
    drop(body);
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::Cancelled);
    within_a_tick(event.blocked_on_reader().expect("measured"), 3 * SECOND);
    let line = event.to_json();
    let ms: u64 = line
        .split(r#""blocked_ms":"#)
        .nth(1)
        .and_then(|rest| rest.trim_end_matches('}').parse().ok())
        .unwrap_or_else(|| panic!("no blocked_ms in {line}"));
    within_a_tick(Duration::from_millis(ms), 3 * SECOND);
}

#[tokio::test(start_paused = true)]
async fn waits_add_up_and_a_reader_that_comes_back_at_once_adds_nothing() {
    let guard = guard(StreamGuardLayer::builder().max_lifetime(3600 * SECOND));
    let mut events = guard.subscribe();
    let mut body = open(&guard, Producer::Endless).await;
    for pause in [SECOND, Duration::ZERO, 2 * SECOND, Duration::ZERO] {
        read_one(&mut body).await;
        sleep(pause).await;
    }
    // A reader that keeps up: many frames, no time passes between them.
    for _ in 0..100 {
        read_one(&mut body).await;
    }
    drop(body);
    let event = next_event(&mut events).await;
    within_a_tick(event.blocked_on_reader().expect("measured"), 3 * SECOND);
}

#[tokio::test(start_paused = true)]
async fn a_producer_with_nothing_to_send_is_not_blocked_on_its_reader() {
    let guard = guard(StreamGuardLayer::builder().max_lifetime(3600 * SECOND));
    let mut events = guard.subscribe();
    let mut body = open(&guard, Producer::OneThenNothing).await;
    read_one(&mut body).await;
    // The reader is right back; the producer has nothing for 10 s.
    poll_nothing(&mut body).await;
    sleep(10 * SECOND).await;
    poll_nothing(&mut body).await;
    drop(body);
    let event = next_event(&mut events).await;
    within_a_tick(event.blocked_on_reader().expect("measured"), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_never_comes_back_is_blocked_until_the_guard_ends_the_stream() {
    let guard = guard(StreamGuardLayer::builder().response_idle_timeout(5 * SECOND));
    let mut events = guard.subscribe();
    let started = Instant::now();
    let mut body = open(&guard, Producer::Endless).await;
    read_one(&mut body).await;
    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    within_a_tick(
        event.blocked_on_reader().expect("measured"),
        started.elapsed(),
    );
    drop(body);
}

/// An SSE subscription: a bodyless request whose stream's only limit is the
/// request's idle timeout, which the request's end at once puts out of
/// play. The stream still has a time limit, so its blocked time is measured
/// on a clock that runs for it, not on one that some other stream may or
/// may not keep running (here none does).
#[tokio::test(start_paused = true)]
async fn a_bodyless_request_under_a_request_idle_timeout_measures_its_blocked_time() {
    let guard = guard(StreamGuardLayer::builder().request_idle_timeout(60 * SECOND));
    let mut events = guard.subscribe();
    let mut body = open(&guard, Producer::Endless).await;
    read_one(&mut body).await;
    sleep(5 * SECOND).await;
    read_one(&mut body).await;
    drop(body);
    let event = next_event(&mut events).await;
    within_a_tick(event.blocked_on_reader().expect("measured"), 5 * SECOND);
}

#[tokio::test(start_paused = true)]
async fn without_a_time_limit_the_blocked_time_is_not_measured() {
    let guard = guard(StreamGuardLayer::builder());
    let mut events = guard.subscribe();
    let mut body = open(&guard, Producer::Endless).await;
    read_one(&mut body).await;
    sleep(3 * SECOND).await;
    read_one(&mut body).await;
    drop(body);
    let event = next_event(&mut events).await;
    assert_eq!(event.blocked_on_reader(), None);
    assert!(
        !event.to_json().contains("blocked_ms"),
        "{}",
        event.to_json()
    );
}

/// A reader that takes one frame every `period`, for `reads` frames (or
/// until the stream ends); returns the frames it read.
async fn trickle(body: &mut ResponseBody<Produced>, period: Duration, reads: usize) -> usize {
    let mut read = 0;
    while read < reads {
        match body.frame().await {
            Some(Ok(_)) => read += 1,
            _ => break,
        }
        sleep(period).await;
    }
    read
}

const WINDOW: Duration = Duration::from_secs(10);

#[tokio::test(start_paused = true)]
async fn a_trickle_reader_below_the_minimum_rate_ends_slow_reader() {
    // 10 bytes every 2 s: 50 bytes per 10 s window, against 100 asked for.
    let guard = guard(StreamGuardLayer::builder().min_response_rate(100, WINDOW));
    let mut events = guard.subscribe();
    let mut body = open(&guard, Producer::Endless).await;
    let read = trickle(&mut body, 2 * SECOND, usize::MAX).await;
    let event = next_event(&mut events).await;
    let ended = event.duration();
    assert_eq!(event.reason(), EndReason::SlowReader, "{event:?}");
    assert_eq!(event.reason().as_str(), "slow_reader");
    assert_eq!(event.limit(), Some(WINDOW));
    // The first window that fell short ends it, within a tick.
    assert!(
        ended >= WINDOW && ended <= WINDOW + TICK,
        "ended after {ended:?}"
    );
    assert!(read <= 6, "read {read} frames");
    within_a_tick(event.blocked_on_reader().expect("measured"), ended);
    assert!(event.to_json().contains(r#""reason":"slow_reader""#));
}

#[tokio::test(start_paused = true)]
async fn a_trickle_reader_above_the_minimum_rate_is_left_alone() {
    // 50 bytes per window against 40 asked for.
    let guard = guard(StreamGuardLayer::builder().min_response_rate(40, WINDOW));
    let mut events = guard.subscribe();
    let mut body = open(&guard, Producer::Endless).await;
    // Two minutes of trickle: twelve windows.
    assert_eq!(trickle(&mut body, 2 * SECOND, 60).await, 60);
    assert!(events.try_recv().is_err(), "still open");
    drop(body);
    assert_eq!(next_event(&mut events).await.reason(), EndReason::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_stops_reading_ends_slow_reader_after_one_window() {
    let guard = guard(StreamGuardLayer::builder().min_response_rate(100, WINDOW));
    let mut events = guard.subscribe();
    let started = Instant::now();
    let mut body = open(&guard, Producer::Endless).await;
    read_one(&mut body).await;
    let event = next_event(&mut events).await;
    assert_eq!(event.reason(), EndReason::SlowReader);
    let ended = started.elapsed();
    assert!(
        ended >= WINDOW && ended <= WINDOW + TICK,
        "ended after {ended:?}"
    );
    // The guard's end reaches the reader when it comes back.
    let err = body
        .frame()
        .await
        .expect("an end")
        .expect_err("the guard's error");
    assert!(err.to_string().contains("min_response_rate"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_producer_with_nothing_to_send_is_not_a_slow_reader() {
    let guard = guard(StreamGuardLayer::builder().min_response_rate(100, WINDOW));
    let mut events = guard.subscribe();
    let mut body = open(&guard, Producer::OneThenNothing).await;
    read_one(&mut body).await;
    // The reader is there: hyper polls, the producer has nothing.
    poll_nothing(&mut body).await;
    let waited = tokio::time::timeout(60 * WINDOW, events.recv()).await;
    assert!(waited.is_err(), "ended: {waited:?}");
    drop(body);
}

#[tokio::test(start_paused = true)]
async fn a_producer_with_nothing_to_send_ends_at_the_idle_timeout_not_the_rate() {
    let guard = guard(
        StreamGuardLayer::builder()
            .min_response_rate(100, WINDOW)
            .response_idle_timeout(3 * WINDOW),
    );
    let mut events = guard.subscribe();
    let started = Instant::now();
    let mut body = open(&guard, Producer::OneThenNothing).await;
    read_one(&mut body).await;
    poll_nothing(&mut body).await;
    let event = next_event(&mut events).await;
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert!(started.elapsed() >= 3 * WINDOW);
    drop(body);
}

#[tokio::test(start_paused = true)]
async fn a_route_sets_its_own_minimum_rate() {
    let guard = guard(
        StreamGuardLayer::builder()
            .min_response_rate(1, WINDOW)
            .route(
                "/feed",
                tower_stream_guard::RoutePolicy::new().min_response_rate(100, WINDOW),
            ),
    );
    assert_eq!(guard.policy().min_response_rate(), Some((1, WINDOW)));
    let mut events = guard.subscribe();
    let mut body = open(&guard, Producer::Endless).await;
    trickle(&mut body, 2 * SECOND, usize::MAX).await;
    assert_eq!(
        next_event(&mut events).await.reason(),
        EndReason::SlowReader
    );
}

#[test]
fn a_minimum_rate_the_timer_cannot_check_fails_at_build() {
    use tower_stream_guard::ConfigError;
    let build = |bytes, window| {
        StreamGuardLayer::builder()
            .min_response_rate(bytes, window)
            .build()
            .err()
    };
    let zero = Some(ConfigError::Zero {
        setting: "min_response_rate",
    });
    assert_eq!(build(0, WINDOW), zero);
    assert_eq!(build(100, Duration::ZERO), zero);
    assert!(matches!(
        build(100, Duration::from_millis(1)),
        Some(ConfigError::BelowResolution { .. })
    ));
    let err = StreamGuardLayer::builder()
        .route(
            "/feed",
            tower_stream_guard::RoutePolicy::new().min_response_rate(0, WINDOW),
        )
        .build()
        .unwrap_err();
    assert!(matches!(err, ConfigError::Route { .. }), "{err}");
}
