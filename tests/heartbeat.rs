//! Heartbeats under paused time: response data frames a `Heartbeat` matches
//! go to the peer and are counted, but do not reset the idle clock; real
//! data does; a route can have its own.

use std::{convert::Infallible, pin::Pin, time::Duration};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use tokio::{
    sync::broadcast,
    task::JoinHandle,
    time::{Instant, sleep},
};
use tower::{Layer, Service, ServiceExt};
use tower_stream_guard::{
    EndEvent, EndReason, Heartbeat, IdleDirection, RoutePolicy, StreamGuardBuilder,
    StreamGuardLayer, stream::RequestBody,
};

#[path = "support/paused.rs"]
mod paused;
use paused::{SECOND, TICK, guard, next_event};

const IDLE: Duration = Duration::from_secs(5);
/// axum's default keep-alive.
const KEEP_ALIVE: &[u8] = b":\n\n";
const DATA: &[u8] = b"data: {\"price\":42}\n\n";
/// An application's own ping message (a gRPC message with an empty payload).
const PING: &[u8] = &[0, 0, 0, 0, 0];

/// What a response body sends: frame `n` (from 0) at `offset + n * period`
/// after the request, for ever.
#[derive(Clone, Copy)]
struct Plan {
    offset: Duration,
    period: Duration,
    frame: fn(u64) -> &'static [u8],
}

impl Plan {
    fn every_second(frame: fn(u64) -> &'static [u8]) -> Self {
        Plan {
            offset: SECOND,
            period: SECOND,
            frame,
        }
    }
}

type Frames = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;

/// A service whose response body follows the request's [`Plan`].
fn service(
    guard: &StreamGuardLayer,
) -> impl Service<
    Request<Empty<Bytes>>,
    Response = http::Response<tower_stream_guard::stream::ResponseBody<StreamBody<Frames>>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    guard.layer(tower::service_fn(
        |request: Request<RequestBody<Empty<Bytes>>>| {
            let plan = *request.extensions().get::<Plan>().expect("a plan");
            let start = Instant::now();
            let frames = futures_util::stream::iter(0..).then(move |n| async move {
                let at = start + plan.offset + plan.period * u32::try_from(n).unwrap();
                tokio::time::sleep_until(at).await;
                Ok(Frame::data(Bytes::from_static((plan.frame)(n))))
            });
            let frames: Frames = Box::pin(frames);
            async move { Ok::<_, Infallible>(http::Response::new(StreamBody::new(frames))) }
        },
    ))
}

/// Starts a stream on `path` and reads its response body to its end, on a
/// task of its own (as a peer that keeps reading). The task returns the
/// frames read.
async fn open(guard: &StreamGuardLayer, path: &str, plan: Plan) -> JoinHandle<Vec<Bytes>> {
    let request = Request::get(path)
        .extension(plan)
        .body(Empty::new())
        .unwrap();
    let response = service(guard).oneshot(request).await.unwrap();
    let mut body = response.into_body();
    tokio::spawn(async move {
        let mut read = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            read.push(frame.into_data().expect("only data frames"));
        }
        read
    })
}

/// Waits for the next end event and checks that it is an idle timeout of
/// `direction`, `at` after `started`: at most one timer tick late when no
/// frame reset the clock (the deadline is then the start's, on a tick), two
/// otherwise (a frame is stamped with the next tick's time).
async fn ends_idle_at(
    events: &mut broadcast::Receiver<EndEvent>,
    direction: IdleDirection,
    started: Instant,
    at: Duration,
) -> EndEvent {
    ends_idle_within(events, direction, started, at, TICK).await
}

async fn ends_idle_within(
    events: &mut broadcast::Receiver<EndEvent>,
    direction: IdleDirection,
    started: Instant,
    at: Duration,
    late: Duration,
) -> EndEvent {
    let event = next_event(events).await;
    let ended = started.elapsed();
    assert_eq!(
        event.reason(),
        EndReason::IdleTimeout(direction),
        "{event:?}"
    );
    assert!(
        ended >= at && ended <= at + late,
        "ended after {ended:?}, expected {at:?}"
    );
    event
}

fn keep_alive(_: u64) -> &'static [u8] {
    KEEP_ALIVE
}

#[tokio::test(start_paused = true)]
async fn heartbeats_alone_end_at_the_response_idle_timeout() {
    let guard = guard(
        StreamGuardBuilder::default()
            .response_idle_timeout(IDLE)
            .heartbeat(Heartbeat::sse_comment()),
    );
    let mut events = guard.subscribe();
    let started = Instant::now();
    let reader = open(&guard, "/events", Plan::every_second(keep_alive)).await;
    let event = ends_idle_at(&mut events, IdleDirection::Response, started, IDLE).await;
    // The heartbeats at 1..=4 s went out and are counted; the 5 s one
    // arrives no sooner than the deadline, whichever wins the tick.
    let read = reader.await.unwrap();
    assert!(read.len() == 4 || read.len() == 5, "{}", read.len());
    assert!(read.iter().all(|frame| frame == KEEP_ALIVE));
    assert_eq!(event.response().frames, read.len() as u64);
    assert_eq!(
        event.response().bytes,
        (read.len() * KEEP_ALIVE.len()) as u64
    );
    assert_eq!(guard.active_streams(), 0);
}

#[tokio::test(start_paused = true)]
async fn heartbeats_alone_end_at_the_idle_timeout_of_both_directions() {
    let guard = guard(
        StreamGuardBuilder::default()
            .idle_timeout(IDLE)
            .heartbeat(Heartbeat::sse_comment()),
    );
    let mut events = guard.subscribe();
    let started = Instant::now();
    let _reader = open(&guard, "/events", Plan::every_second(keep_alive)).await;
    ends_idle_at(&mut events, IdleDirection::Both, started, IDLE).await;
}

#[tokio::test(start_paused = true)]
async fn without_a_heartbeat_keep_alives_keep_a_dead_stream_open() {
    let guard = guard(StreamGuardBuilder::default().response_idle_timeout(IDLE));
    let mut events = guard.subscribe();
    let reader = open(&guard, "/events", Plan::every_second(keep_alive)).await;
    sleep(Duration::from_secs(60)).await;
    assert!(events.try_recv().is_err(), "no end within 60 s");
    assert_eq!(guard.active_streams(), 1);
    assert!(!reader.is_finished());
}

#[tokio::test(start_paused = true)]
async fn real_data_resets_the_idle_clock_and_heartbeats_do_not() {
    let guard = guard(
        StreamGuardBuilder::default()
            .response_idle_timeout(IDLE)
            .heartbeat(Heartbeat::sse_comment()),
    );
    let mut events = guard.subscribe();
    let started = Instant::now();
    // Heartbeats at 0.5 and 2.5 s, data at 4.5 s, heartbeats every two
    // seconds after it: the stream is idle from 4.5 s on. (Without the data
    // it would end at 5 s, and with heartbeats counted never.)
    let plan = Plan {
        offset: SECOND / 2,
        period: 2 * SECOND,
        frame: |n| if n == 2 { DATA } else { KEEP_ALIVE },
    };
    let reader = open(&guard, "/events", plan).await;
    let at = Duration::from_millis(4500) + IDLE;
    let event = ends_idle_within(&mut events, IdleDirection::Response, started, at, 2 * TICK).await;
    // Every frame that moved is counted: 0.5 s to 8.5 s, 4 heartbeats and
    // the data.
    let read = reader.await.unwrap();
    assert_eq!(read.len(), 5);
    assert_eq!(read[2], DATA);
    assert_eq!(event.response().frames, 5);
    assert_eq!(
        event.response().bytes,
        (4 * KEEP_ALIVE.len() + DATA.len()) as u64
    );
}

#[tokio::test(start_paused = true)]
async fn data_every_second_keeps_a_stream_with_a_heartbeat_open() {
    let guard = guard(
        StreamGuardBuilder::default()
            .response_idle_timeout(IDLE)
            .heartbeat(Heartbeat::sse_comment()),
    );
    let mut events = guard.subscribe();
    let _reader = open(&guard, "/events", Plan::every_second(|_| DATA)).await;
    sleep(Duration::from_secs(60)).await;
    assert!(events.try_recv().is_err(), "no end within 60 s");
    assert_eq!(guard.active_streams(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_route_heartbeat_applies_to_that_route_only() {
    let guard = guard(
        StreamGuardBuilder::default()
            .response_idle_timeout(IDLE)
            .route(
                "/events",
                RoutePolicy::new().heartbeat(Heartbeat::sse_comment()),
            )
            .route(
                "/ping",
                RoutePolicy::new().heartbeat(Heartbeat::new(|frame| frame == PING)),
            ),
    );
    let mut events = guard.subscribe();
    let started = Instant::now();
    let _events = open(&guard, "/events", Plan::every_second(keep_alive)).await;
    let _pings = open(&guard, "/ping", Plan::every_second(|_| PING)).await;
    // Not heartbeats on these: the route's own, and no route.
    let _comments = open(&guard, "/ping", Plan::every_second(keep_alive)).await;
    let _other = open(&guard, "/other", Plan::every_second(keep_alive)).await;
    let mut ended = Vec::new();
    for _ in 0..2 {
        let event = ends_idle_at(&mut events, IdleDirection::Response, started, IDLE).await;
        ended.push(event.path().to_owned());
    }
    ended.sort();
    assert_eq!(ended, ["/events", "/ping"]);
    sleep(Duration::from_secs(60)).await;
    assert!(events.try_recv().is_err(), "no other end within 60 s");
    assert_eq!(guard.active_streams(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_layer_heartbeat_reaches_routes_without_their_own() {
    let guard = guard(
        StreamGuardBuilder::default()
            .response_idle_timeout(IDLE)
            .heartbeat(Heartbeat::sse_comment())
            .route("/capped", RoutePolicy::new().max_streams(10)),
    );
    let mut events = guard.subscribe();
    let started = Instant::now();
    let _reader = open(&guard, "/capped", Plan::every_second(keep_alive)).await;
    let event = ends_idle_at(&mut events, IdleDirection::Response, started, IDLE).await;
    assert_eq!(event.path(), "/capped");
}
