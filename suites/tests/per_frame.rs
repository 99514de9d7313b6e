//! "Nothing per data frame": once a guarded stream's first frame went by,
//! its bodies' frames cost no allocation (so no timer filing, no boxed
//! waker, no event), counted with a counting global allocator. Its own test
//! target: the allocator counts every thread of the process, so something
//! another thread allocates meanwhile (the harness, a runtime's background
//! threads) counts too: once, on a loaded CI machine, 4 allocations (900
//! bytes) fell into one run of 20,000 frames. So the frames run three
//! times: one run with no allocation at all shows there is none per frame,
//! and an allocation every so many frames shows in every run.
//!
//! Clock reads cannot be counted from outside; what was checked by reading
//! the code instead: a data frame's note (`Record::note_response_frame`,
//! `note_request_frame`, `response_polled`) reads the timer's coarse clock,
//! a relaxed atomic load (`Timer::stamp`), never `Instant::now`, and takes
//! no lock.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_stream_guard::{StreamGuardLayer, stream::RequestBody};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const FRAMES: usize = 10_000;

/// A body that always has a frame ready, never allocating one.
struct Endless;

impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"frame")))))
    }
}

/// Polls `body` for one data frame, with a waker that does nothing.
fn one_frame<B: Body + Unpin>(body: &mut B)
where
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => assert!(frame.is_data()),
        other => panic!("no data frame: {:?}", other.map(|f| f.map(|f| f.is_ok()))),
    }
}

#[tokio::test]
async fn a_guarded_streams_data_frames_allocate_nothing_after_the_first() {
    // Every limit that watches frames, so that each frame has its notes.
    let guard = StreamGuardLayer::builder()
        .request_idle_timeout(Duration::from_secs(60))
        .response_idle_timeout(Duration::from_secs(60))
        .max_lifetime(Duration::from_secs(3600))
        .build()
        .expect("valid configuration");
    let handed: Arc<Mutex<Option<RequestBody<Endless>>>> = Arc::default();
    let keep = Arc::clone(&handed);
    let mut svc = guard.layer(service_fn(move |request: Request<RequestBody<Endless>>| {
        *keep.lock().unwrap() = Some(request.into_body());
        async { Ok::<_, Infallible>(Response::new(Endless)) }
    }));
    let request = Request::post("/echo.Echo/Bidi")
        .header("content-type", "application/grpc")
        .body(Endless)
        .unwrap();
    let mut response = svc.ready().await.unwrap().call(request).await.unwrap();
    let mut request_body = handed.lock().unwrap().take().expect("the request body");
    // The first frames may file the stream with the timer.
    one_frame(response.body_mut());
    one_frame(&mut request_body);

    let runs: Vec<_> = (0..3)
        .map(|_| {
            let region = Region::new(ALLOCATOR);
            for _ in 0..FRAMES {
                one_frame(response.body_mut());
                one_frame(&mut request_body);
            }
            region.change()
        })
        .collect();
    assert!(
        runs.iter()
            .any(|change| (change.allocations, change.reallocations) == (0, 0)),
        "allocations while {FRAMES} frames went each way, three times: {runs:?}"
    );
    drop((response, request_body));
}
