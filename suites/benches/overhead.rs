//! What the guard costs per data frame and per stream, side by side with a
//! bare body, a do-nothing wrapper and tower-http's body timeouts.
//!
//! ```text
//! cargo bench -p stream-guard-suites --bench overhead                       # full run, about two minutes
//! cargo bench -p stream-guard-suites --bench overhead -- --quick            # smoke run
//! cargo bench -p stream-guard-suites --bench overhead -- per-frame/always   # one family of groups
//! cargo bench -p stream-guard-suites --bench overhead -- per-stream-threads # per stream from N threads, ~40 s
//! ```
//!
//! # Groups
//!
//! - `per-frame/always-ready`: a body whose every poll yields a data frame.
//! - `per-frame/pending-then-ready`: a body that returns `Pending` (waking its
//!   waker) before every frame, as a streaming handler's channel does: two
//!   polls per frame.
//! - `.../boxed` variants of both: the same body boxed
//!   (`UnsyncBoxBody`), as tonic's and axum's response bodies are. The call
//!   into the inner body cannot be inlined then, and each frame travels
//!   through memory, as in a real server.
//! - `per-stream`: one whole stream through a service: call, response body
//!   polled to its end (4 data frames), end event. Besides the contestants
//!   below: `guard+subscriber` (an end-event receiver drains every event),
//!   `guard+caps` (per-connection, per-peer and total caps, none full: slots
//!   taken and given back per stream; its requests carry a `ConnectionKey`
//!   and a `PeerAddr`, as a server's would), `guard+caps-baseline` (the same
//!   requests without caps) and `guard+drain` (a drain configured, not
//!   started) and `guard+metrics` (metrics on, recorded by
//!   metrics-exporter-prometheus's recorder, the one the `prometheus`
//!   example serves).
//! - `per-stream-threads`: the same whole streams from N threads at once,
//!   N = 1, 2 and the machine's `available_parallelism` (each once). One
//!   layer per contestant, shared by every thread as a server's is; each
//!   thread has its own current-thread runtime (settled, see [`settle`]) and
//!   its own service made from that layer, and runs its share of the
//!   iteration's streams. Threads are started once per benchmark and wait on
//!   a barrier, so their start-up is not measured; the time is from the
//!   first thread's start to the last one's finish. Throughput in streams:
//!   compare each contestant's streams/s at N with its own at 1 (the guard
//!   shares its timer shards and counters between threads; tower-http shares
//!   nothing, each thread's `Sleep`s go to its own runtime's timer wheel).
//!   The guard's sweeper task lands on the runtime of the first stream and,
//!   as in `per-stream`, never runs during a measurement. Contestants
//!   `guard`, `guard-per-thread` (a layer of its own per thread: the
//!   control, what the guard would cost were nothing shared between
//!   threads) and `tower-http-timeout`, named
//!   `per-stream-threads/CONTESTANT/N`.
//!
//! The per-frame benchmarks poll [`FRAMES_PER_ITER`] frames per iteration and
//! report throughput in frames: with 1000 frames per iteration, the time per
//! iteration in µs reads as ns per frame.
//!
//! # Contestants
//!
//! - `bare`: the body alone;
//! - `noop-wrapper`: a wrapper that only boxes the body's errors, as every
//!   middleware body does: the cost of wrapping at all;
//! - `guard`: the body as the response body of a [`StreamGuardLayer`] with an
//!   idle timeout and a maximum lifetime, obtained through the layer as a user
//!   gets it;
//! - `guard+heartbeat`: the same with
//!   [`Heartbeat::sse_comment`](tower_stream_guard::Heartbeat::sse_comment)
//!   set: the predicate runs on every frame (the frames are SSE `data:`
//!   events, so it answers "not a heartbeat" after one byte, and the frame
//!   marks activity as in `guard`);
//! - `tower-http-timeout`: tower-http's `TimeoutBody` (an idle timeout: it
//!   creates and drops a tokio `Sleep` for every frame);
//! - `tower-http-deadline`: tower-http's `DeadlineBody` (a total deadline: it
//!   polls one `Sleep` before every frame).
//!
//! # Setting
//!
//! Every body is polled with a no-op waker on the bench thread (on worker
//! threads in `per-stream-threads`), inside a
//! current-thread tokio runtime's context (`Runtime::enter`) so that timers
//! can be created. The runtime is driven only briefly before measuring (see
//! [`settle`]): no timer fires and the guard's sweeper task does not run
//! during a measurement. Limits are an hour or more, far beyond any
//! measurement.

use std::{
    convert::Infallible,
    future::Future,
    hint::black_box,
    pin::{Pin, pin},
    sync::{Barrier, mpsc},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, combinators::UnsyncBoxBody};
use tokio::{runtime::Runtime, time::Sleep};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_http::timeout::{DeadlineBody, ResponseBodyTimeoutLayer, TimeoutBody};
use tower_stream_guard::{
    BoxError, ConnectionKey, Drain, Heartbeat, PeerAddr, StreamGuardLayer, stream::ResponseBody,
};

/// Frames polled per iteration of a per-frame benchmark.
const FRAMES_PER_ITER: u64 = 1000;

/// Data frames in one stream of the per-stream group.
const FRAMES_PER_STREAM: u64 = 4;

/// Limits far beyond any measurement: nothing fires while we poll.
const IDLE: Duration = Duration::from_secs(3600);
const LIFETIME: Duration = Duration::from_secs(2 * 3600);

/// A timer due before any of the contestants' limits; see [`settle`].
const ANCHOR: Duration = Duration::from_secs(600);

/// The payload of every frame: a static `Bytes`, whose clone touches no
/// reference count, so that the frame itself costs next to nothing.
static CHUNK: &[u8] = b"data: {\"tick\":1}\n\n";

/// A body that yields `remaining` data frames, each on its first poll, or
/// (with `pending_first`) on the poll after one that returned `Pending` and
/// woke the waker.
struct FrameBody {
    remaining: u64,
    pending_first: bool,
    pending_now: bool,
}

impl FrameBody {
    fn ready(frames: u64) -> Self {
        FrameBody {
            remaining: frames,
            pending_first: false,
            pending_now: false,
        }
    }

    fn pending_then_ready(frames: u64) -> Self {
        FrameBody {
            remaining: frames,
            pending_first: true,
            pending_now: true,
        }
    }
}

impl Body for FrameBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        if self.pending_now {
            self.pending_now = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.pending_now = self.pending_first;
        self.remaining -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(CHUNK)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The control: a wrapper that does nothing but box its body's errors.
struct NoopWrapper<B>(B);

impl<B> Body for NoopWrapper<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// Lets the runtime's timer driver park once while `anchor` (a timer due
/// before any limit of the contestants) is pending, as the driver of a live
/// server does all the time. A driver that never parked has no "next wake-up"
/// yet, and then tokio wakes it (a syscall) for *every* timer registered: an
/// artefact of never driving the runtime that would inflate `TimeoutBody`
/// about eightfold.
fn settle(rt: &Runtime, anchor: Pin<&mut Sleep>) {
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_millis(1), anchor).await;
    });
}

fn guard_layer() -> StreamGuardLayer {
    StreamGuardLayer::builder()
        .idle_timeout(IDLE)
        .max_lifetime(LIFETIME)
        .build()
        .expect("a valid guard configuration")
}

/// [`guard_layer`] with SSE comments as heartbeats.
fn heartbeat_layer() -> StreamGuardLayer {
    StreamGuardLayer::builder()
        .idle_timeout(IDLE)
        .max_lifetime(LIFETIME)
        .heartbeat(Heartbeat::sse_comment())
        .build()
        .expect("a valid guard configuration")
}

/// Polls a future that is ready at once (every service here answers on its
/// first poll).
fn ready_now<F: Future>(future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the service did not answer at once"),
    }
}

/// The guard's response body around `body`, obtained the way a user gets one:
/// through a service behind the layer. Needs a runtime context (the guard
/// starts its timer task on the first stream).
fn guarded<B>(layer: &StreamGuardLayer, body: B) -> ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut body = Some(body);
    let service = layer.layer(service_fn(move |_: Request<_>| {
        let body = body.take().expect("one call per service");
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let response = ready_now(service.oneshot(Request::new(Empty::<Bytes>::new())))
        .unwrap_or_else(|never| match never {});
    response.into_body()
}

/// Takes the data out of a frame, as hyper does before it moves the `Bytes`
/// into the connection's send buffer; here it is only measured and dropped
/// (an opaque call through the `Bytes` vtable, so nothing is optimised away).
fn consume(frame: Frame<Bytes>) -> usize {
    match frame.into_data() {
        Ok(data) => data.len(),
        Err(_) => panic!("a data frame was expected"),
    }
}

/// Polls `frames` data frames out of `body`, however many polls that takes.
/// Returns the bytes seen so that nothing is optimised away.
fn poll_frames<B>(mut body: Pin<&mut B>, frames: u64) -> usize
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut seen = 0;
    let mut bytes = 0;
    while seen < frames {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                bytes += consume(frame);
                seen += 1;
            }
            Poll::Pending => {}
            Poll::Ready(Some(Err(err))) => panic!("body failed: {err:?}"),
            Poll::Ready(None) => panic!("body ended early"),
        }
    }
    bytes
}

/// The contestants of one per-frame group, around bodies `make` builds.
fn per_frame<B>(c: &mut Criterion, group: &str, make: impl Fn() -> B)
where
    B: Body<Data = Bytes, Error = Infallible> + Unpin,
{
    let rt = runtime();
    let _context = rt.enter();
    let mut group = c.benchmark_group(group);
    group.throughput(Throughput::Elements(FRAMES_PER_ITER));

    let mut bare = pin!(make());
    let mut noop = pin!(NoopWrapper(make()));
    let layer = guard_layer();
    let mut guard = pin!(guarded(&layer, make()));
    let heartbeat = heartbeat_layer();
    let mut beating = pin!(guarded(&heartbeat, make()));
    let mut timeout = pin!(TimeoutBody::new(IDLE, make()));
    let mut deadline = pin!(DeadlineBody::new(LIFETIME, make()));
    let anchor = pin!(tokio::time::sleep(ANCHOR));
    settle(&rt, anchor);

    group.bench_function("bare", |b| {
        b.iter(|| poll_frames(bare.as_mut(), FRAMES_PER_ITER));
    });
    group.bench_function("noop-wrapper", |b| {
        b.iter(|| poll_frames(noop.as_mut(), FRAMES_PER_ITER));
    });
    group.bench_function("guard", |b| {
        b.iter(|| poll_frames(guard.as_mut(), FRAMES_PER_ITER));
    });
    group.bench_function("guard+heartbeat", |b| {
        b.iter(|| poll_frames(beating.as_mut(), FRAMES_PER_ITER));
    });
    group.bench_function("tower-http-timeout", |b| {
        b.iter(|| poll_frames(timeout.as_mut(), FRAMES_PER_ITER));
    });
    group.bench_function("tower-http-deadline", |b| {
        b.iter(|| poll_frames(deadline.as_mut(), FRAMES_PER_ITER));
    });
    assert_eq!(layer.active_streams(), 1, "the guarded stream stays open");
    assert_eq!(
        heartbeat.active_streams(),
        1,
        "the guarded stream stays open"
    );

    group.finish();
}

/// Bodies that never end for all practical purposes: a bench never reaches
/// the end, so it measures the steady state only.
const ENDLESS: u64 = u64::MAX;

fn boxed(body: FrameBody) -> UnsyncBoxBody<Bytes, Infallible> {
    body.boxed_unsync()
}

fn always_ready(c: &mut Criterion) {
    per_frame(c, "per-frame/always-ready", || FrameBody::ready(ENDLESS));
    per_frame(c, "per-frame/always-ready/boxed", || {
        boxed(FrameBody::ready(ENDLESS))
    });
}

fn pending_then_ready(c: &mut Criterion) {
    per_frame(c, "per-frame/pending-then-ready", || {
        FrameBody::pending_then_ready(ENDLESS)
    });
    per_frame(c, "per-frame/pending-then-ready/boxed", || {
        boxed(FrameBody::pending_then_ready(ENDLESS))
    });
}

/// Runs one stream through `service` the way hyper does: call, then poll the
/// response body until it says it is at its end.
fn one_stream<S, B>(service: &mut S) -> usize
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    one_stream_of(service, Request::new(Empty::new()))
}

/// [`one_stream`] with a request of the caller's.
fn one_stream_of<S, B>(service: &mut S, request: Request<Empty<Bytes>>) -> usize
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = ready_now(service.call(request)).unwrap_or_else(|never| match never {});
    let mut body = pin!(response.into_body());
    let mut cx = Context::from_waker(Waker::noop());
    let mut bytes = 0;
    while !body.is_end_stream() {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => bytes += consume(frame),
            Poll::Ready(None) => break,
            Poll::Pending => panic!("the body is always ready"),
            Poll::Ready(Some(Err(err))) => panic!("body failed: {err:?}"),
        }
    }
    bytes
}

/// The handler of the per-stream group: answers at once with a short body.
async fn respond<B>(_: Request<B>) -> Result<Response<FrameBody>, Infallible> {
    Ok(Response::new(FrameBody::ready(FRAMES_PER_STREAM)))
}

fn per_stream(c: &mut Criterion) {
    let rt = runtime();
    let _context = rt.enter();
    let mut group = c.benchmark_group("per-stream");
    group.throughput(Throughput::Elements(1));
    let anchor = pin!(tokio::time::sleep(ANCHOR));
    settle(&rt, anchor);

    let mut bare = service_fn(respond);
    group.bench_function("bare", |b| {
        b.iter(|| one_stream(&mut bare));
    });

    let layer = guard_layer();
    let mut guard = layer.layer(service_fn(respond));
    group.bench_function("guard", |b| {
        b.iter(|| one_stream(&mut guard));
    });
    assert_eq!(layer.active_streams(), 0, "every stream has ended");

    // The same with metrics on, recorded by the Prometheus exporter's
    // recorder (what the `prometheus` example installs), rendered once at
    // the end as a scrape would.
    {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("the only recorder of this binary");
        let layer = StreamGuardLayer::builder()
            .idle_timeout(IDLE)
            .max_lifetime(LIFETIME)
            .metrics(true)
            .build()
            .expect("valid configuration");
        let mut guard = layer.layer(service_fn(respond));
        group.bench_function("guard+metrics", |b| {
            b.iter(|| one_stream(&mut guard));
        });
        assert_eq!(layer.active_streams(), 0, "every stream has ended");
        black_box(handle.render());
    }

    let layer = guard_layer();
    let mut events = layer.subscribe();
    let mut guard = layer.layer(service_fn(respond));
    group.bench_function("guard+subscriber", |b| {
        b.iter(|| {
            let bytes = one_stream(&mut guard);
            let event = events.try_recv().expect("one end event per stream");
            black_box(event);
            bytes
        });
    });

    // Every cap at once, each far from full; the request carries what a
    // server's accept loop would give it: a connection key and a peer.
    let layer = StreamGuardLayer::builder()
        .idle_timeout(IDLE)
        .max_lifetime(LIFETIME)
        .max_streams_per_connection(1_000_000)
        .max_streams_per_peer(1_000_000)
        .max_streams(1_000_000)
        .build()
        .expect("valid configuration");
    let mut guard = layer.layer(service_fn(respond));
    let peer = std::net::SocketAddr::from(([10, 0, 0, 7], 50_000));
    let request = || {
        let mut request = Request::new(Empty::new());
        request.extensions_mut().insert(ConnectionKey::from_id(7));
        request.extensions_mut().insert(PeerAddr(peer));
        request
    };
    group.bench_function("guard+caps", |b| {
        b.iter(|| one_stream_of(&mut guard, request()));
    });
    // The same requests without caps: what building them costs.
    let mut uncapped = guard_layer().layer(service_fn(respond));
    group.bench_function("guard+caps-baseline", |b| {
        b.iter(|| one_stream_of(&mut uncapped, request()));
    });
    assert_eq!(layer.active_streams(), 0, "every stream has ended");
    assert!(layer.connection_streams().is_empty(), "every slot is back");

    // A drain files streams in the timer even without a deadline.
    let drain = Drain::new();
    let layer = StreamGuardLayer::builder()
        .idle_timeout(IDLE)
        .max_lifetime(LIFETIME)
        .drain(&drain)
        .build()
        .expect("valid configuration");
    let mut guard = layer.layer(service_fn(respond));
    group.bench_function("guard+drain", |b| {
        b.iter(|| one_stream(&mut guard));
    });

    // tower-http's `TimeoutBody` does not forward `is_end_stream`, so its
    // stream takes one more poll (and one more `Sleep`) to see its end.
    let mut timeout = ResponseBodyTimeoutLayer::new(IDLE).layer(service_fn(respond));
    group.bench_function("tower-http-timeout", |b| {
        b.iter(|| one_stream(&mut timeout));
    });

    group.finish();
}

/// Per stream from several threads at once: see the module docs.
fn per_stream_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("per-stream-threads");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut counts = vec![1, 2, cores];
    counts.sort_unstable();
    counts.dedup();

    let guard = guard_layer();
    let timeout = ResponseBodyTimeoutLayer::new(IDLE);
    for &threads in &counts {
        on_threads(&mut group, "guard", threads, &|| {
            guard.layer(service_fn(respond))
        });
        assert_eq!(guard.active_streams(), 0, "every stream has ended");
        on_threads(&mut group, "guard-per-thread", threads, &|| {
            guard_layer().layer(service_fn(respond))
        });
        on_threads(&mut group, "tower-http-timeout", threads, &|| {
            timeout.layer(service_fn(respond))
        });
    }
    group.finish();
}

/// Benchmarks `name` at `threads` threads, each running streams through a
/// service `make` builds on that thread. The threads live as long as the
/// benchmark; per batch of criterion's, each gets its share of the streams,
/// all start together at a barrier, and the batch takes from the first
/// thread's start to the last one's finish.
fn on_threads<S, B>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    threads: usize,
    make: &(impl Fn() -> S + Sync),
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let start = Barrier::new(threads);
    let (finished, spans) = mpsc::channel::<(Instant, Instant)>();
    std::thread::scope(|scope| {
        let jobs: Vec<mpsc::Sender<u64>> = (0..threads)
            .map(|_| {
                let (job, streams) = mpsc::channel::<u64>();
                let finished = finished.clone();
                let start = &start;
                scope.spawn(move || stream_worker(make, start, &streams, &finished));
                job
            })
            .collect();
        group.bench_function(BenchmarkId::new(name, threads), |b| {
            b.iter_custom(|iters| {
                let workers = threads as u64;
                for (i, job) in (0_u64..).zip(&jobs) {
                    let share = iters / workers + u64::from(i < iters % workers);
                    job.send(share).expect("the worker waits for work");
                }
                let (first, last) = (0..threads)
                    .map(|_| spans.recv().expect("every worker reports its batch"))
                    .fold(None, |span: Option<(Instant, Instant)>, (begun, ended)| {
                        Some(match span {
                            None => (begun, ended),
                            Some((first, last)) => (first.min(begun), last.max(ended)),
                        })
                    })
                    .expect("at least one worker");
                last.duration_since(first)
            });
        });
        // Closing the job channels lets the workers return.
        drop(jobs);
    });
}

/// One thread of [`on_threads`]: its own runtime and service; per batch, its
/// share of the streams, started at the common barrier.
fn stream_worker<S, B>(
    make: &impl Fn() -> S,
    start: &Barrier,
    batches: &mpsc::Receiver<u64>,
    finished: &mpsc::Sender<(Instant, Instant)>,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    // The other workers would wait at the barrier, and the bench for this
    // one's report, for ever.
    struct AbortOnPanic;
    impl Drop for AbortOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("a stream worker panicked: aborting the bench");
                std::process::abort();
            }
        }
    }
    let _abort = AbortOnPanic;
    let rt = runtime();
    let _context = rt.enter();
    let anchor = pin!(tokio::time::sleep(ANCHOR));
    settle(&rt, anchor);
    let mut service = make();
    while let Ok(streams) = batches.recv() {
        start.wait();
        let begun = Instant::now();
        for _ in 0..streams {
            black_box(one_stream(&mut service));
        }
        finished
            .send((begun, Instant::now()))
            .expect("the bench waits for every worker");
    }
}

criterion_group! {
    name = overhead;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = always_ready, pending_then_ready, per_stream, per_stream_threads
}
criterion_main!(overhead);
