//! 100,000 concurrent idle guarded streams in one process: memory per
//! guarded stream beyond a bare one, CPU spent while they are all idle, and
//! how long after their deadline the last of them has ended.
//!
//! ```text
//! cargo bench -p stream-guard-suites --bench scale                 # 100,000 streams
//! STREAMS=20000 cargo bench -p stream-guard-suites --bench scale   # fewer
//! ```
//!
//! Streams are opened through the layer as a server opens them (service
//! call, response body kept, never polled: idle, and for the guard's timer
//! the same as stalled readers). Memory is counted twice: the bytes held
//! from the allocator (a counting global allocator: exact, without the
//! allocator's own overhead per block) and the process's resident set size
//! (`/proc/self/statm`, Linux only; includes allocator slack, but moves with
//! the reuse of memory freed earlier in the run), each before and after. The
//! counting allocator adds two atomic additions to every allocation, which
//! the timing figures below include. CPU is the process's user + system time
//! (`/proc/self/stat`) over one idle second. Wake-ups: every guarded body is
//! polled once with a counting waker, so the guard holds a waker per stream;
//! the count of wakes over the idle second shows whether the timer disturbs
//! idle streams. Then the longest stall of a stream start on another thread
//! while `n` streams expire at one deadline (`STALL_ONLY=1` runs only that).
//! Prints one table; no timing assertion.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::Empty;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_stream_guard::{Drain, StreamGuardLayer};

use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Bytes the process holds from the allocator now.
fn heap() -> i64 {
    let stats = ALLOCATOR.stats();
    stats.bytes_allocated as i64 + stats.bytes_reallocated as i64 - stats.bytes_deallocated as i64
}

/// A body that never yields: an idle stream.
struct Idle;

impl Body for Idle {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

async fn respond<B>(_: Request<B>) -> Result<Response<Idle>, Infallible> {
    Ok(Response::new(Idle))
}

/// Counts the wakes of every stream polled with it.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Polls every kept body once, so that each guarded body has registered
/// `waker` with its stream.
fn poll_all<B: Body + Unpin>(kept: &mut [Response<B>], waker: &Waker) {
    let mut cx = Context::from_waker(waker);
    for response in kept {
        assert!(
            Pin::new(response.body_mut())
                .poll_frame(&mut cx)
                .is_pending(),
            "an idle stream yielded a frame"
        );
    }
}

/// How often the runtime's workers have parked (gone to sleep) so far: each
/// wake-up of an idle runtime is one park more.
fn parks() -> u64 {
    let metrics = tokio::runtime::Handle::current().metrics();
    (0..metrics.num_workers())
        .map(|worker| metrics.worker_park_count(worker))
        .sum()
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// User + system CPU time of this process, in clock ticks (1/100 s).
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Opens `n` streams through `service` and keeps their responses.
async fn open<S, B>(service: &mut S, n: usize) -> Vec<Response<B>>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
{
    let mut kept = Vec::with_capacity(n);
    for _ in 0..n {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(Request::new(Empty::new()))
            .await
            .unwrap();
        kept.push(response);
    }
    kept
}

fn main() {
    let n: usize = std::env::var("STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    // `cargo bench` passes `--bench`; a bare run of the binary with `--list`
    // (as `cargo test --benches` does) has nothing to list.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let stall = expiry_stall(n);
    if std::env::var_os("STALL_ONLY").is_some() {
        print_stall(n, &stall);
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(n));
    print_stall(n, &stall);
}

/// Stream starts on another thread before and during a mass expiry.
struct Stall {
    /// Every start's time while the expiring streams sat idle, sorted.
    before: Vec<Duration>,
    /// Every start's time while they expired, sorted.
    during: Vec<Duration>,
    /// From the first expiry sweep to the last stream ended.
    expiry: std::time::Duration,
}

fn print_stall(n: usize, stall: &Stall) {
    // The longest start alone is at the mercy of the OS scheduler on a
    // shared machine: also the 99.9th percentile and the starts over 1 ms.
    let show = |label: &str, starts: &[Duration]| {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let longest = starts.last().copied().unwrap_or_default();
        let p999 = starts
            .get(starts.len().saturating_sub(1) * 999 / 1000)
            .copied()
            .unwrap_or_default();
        let over = starts
            .iter()
            .filter(|d| **d > Duration::from_millis(1))
            .count();
        println!(
            "  stream start, {label}: longest {:>7.3} ms, p99.9 {:>6.3} ms, {over} of {} over 1 ms",
            ms(longest),
            ms(p999),
            starts.len()
        );
    };
    println!("stall: another thread starts and ends streams while {n} expire at one deadline");
    show("before expiry", &stall.before);
    show("during expiry", &stall.during);
    println!(
        "  expiry of all {n}:                  {:>8.1} ms",
        stall.expiry.as_secs_f64() * 1e3
    );
}

/// `n` streams of one guard come due in one sweep: they are opened on a
/// current-thread runtime that then blocks past their lifetime, so its
/// sweeper's first tick finds them all due. Meanwhile a prober thread, on
/// its own runtime, starts and ends streams through the same guard and
/// times each start (which files the stream with the sweeper).
fn expiry_stall(n: usize) -> Stall {
    use std::time::Instant as Wall;

    const BEFORE: usize = 0;
    const DURING: usize = 1;
    const DONE: usize = 2;
    let lifetime = Duration::from_millis(300);
    let expired = Arc::new(AtomicUsize::new(0));
    let guard = {
        let expired = Arc::clone(&expired);
        StreamGuardLayer::builder()
            .max_lifetime(lifetime)
            .event_capacity(16)
            .on_end(move |event| {
                if event.reason() == tower_stream_guard::EndReason::LifetimeExceeded {
                    expired.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build()
            .expect("valid configuration")
    };
    let phase = Arc::new(AtomicUsize::new(BEFORE));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // No yield while opening: the sweeper, spawned on this runtime by
        // the first stream, is not polled until the lifetimes are over.
        let mut guarded = guard.layer(service_fn(respond));
        let kept = open(&mut guarded, n).await;
        let opened = Wall::now();
        let prober = {
            let (guard, phase) = (guard.clone(), Arc::clone(&phase));
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let mut service = guard.layer(service_fn(respond));
                    let mut starts = [Vec::new(), Vec::new()];
                    loop {
                        let at = phase.load(Ordering::Acquire);
                        if at == DONE {
                            return starts;
                        }
                        let ready = service.ready().await.unwrap();
                        let started = Wall::now();
                        let response = ready
                            .call(Request::new(Empty::<Bytes>::new()))
                            .await
                            .unwrap();
                        let took = started.elapsed();
                        drop(response);
                        starts[at].push(took);
                    }
                })
            })
        };
        // Blocks this runtime (and its sweeper) until every lifetime is over.
        std::thread::sleep(lifetime.saturating_sub(opened.elapsed()) + Duration::from_millis(50));
        phase.store(DURING, Ordering::Release);
        let sweep = Wall::now();
        while expired.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let expiry = sweep.elapsed();
        phase.store(DONE, Ordering::Release);
        let [mut before, mut during] = prober.join().expect("prober");
        before.sort_unstable();
        during.sort_unstable();
        drop(kept);
        Stall {
            before,
            during,
            expiry,
        }
    })
}

async fn run(n: usize) {
    let lifetime = Duration::from_secs(3);

    // Bare: the responses alone.
    let (before, heap_before) = (rss(), heap());
    let mut bare = service_fn(respond);
    let kept = open(&mut bare, n).await;
    let bare_bytes = rss().saturating_sub(before);
    let bare_heap = heap() - heap_before;
    drop(kept);

    // Guarded: a lifetime, every end counted by a callback.
    let ended = Arc::new(AtomicUsize::new(0));
    let last_end = Arc::new(Mutex::new(None::<Instant>));
    let guard = {
        let (ended, last_end) = (Arc::clone(&ended), Arc::clone(&last_end));
        StreamGuardLayer::builder()
            .max_lifetime(lifetime)
            .event_capacity(16)
            .on_end(move |_| {
                ended.fetch_add(1, Ordering::Relaxed);
                *last_end.lock().unwrap() = Some(Instant::now());
            })
            .build()
            .expect("valid configuration")
    };
    let mut guarded = guard.layer(service_fn(respond));
    let (before, heap_before) = (rss(), heap());
    let opened_at = Instant::now();
    let mut kept = open(&mut guarded, n).await;
    let open_time = opened_at.elapsed();
    let last_deadline = Instant::now() + lifetime;
    let guarded_bytes = rss().saturating_sub(before);
    let guarded_heap = heap() - heap_before;
    assert_eq!(guard.active_streams(), n);
    let wakes = Arc::new(CountingWaker::default());
    poll_all(&mut kept, &Waker::from(Arc::clone(&wakes)));

    // One idle second: what does the process spend, and does anything wake
    // an idle stream?
    let (cpu_before, parks_before) = (cpu_ticks(), parks());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_cpu_ms = (cpu_ticks() - cpu_before) * 10;
    let idle_parks = parks() - parks_before;
    let idle_wakes = wakes.0.load(Ordering::Relaxed);

    // Every stream's lifetime ends; the last one's deadline is
    // `last_deadline`.
    while ended.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let last = last_end.lock().unwrap().expect("events");
    let after_deadline = last.saturating_duration_since(last_deadline);
    // Ending a stream wakes its body once, so that a reader learns of it.
    let end_wakes = wakes.0.load(Ordering::Relaxed) - idle_wakes;
    drop(kept);

    // A drain: one common deadline for a second batch.
    let drain = Drain::new();
    let ended = Arc::new(AtomicUsize::new(0));
    let last_end = Arc::new(Mutex::new(None::<Instant>));
    let guard = {
        let (ended, last_end) = (Arc::clone(&ended), Arc::clone(&last_end));
        StreamGuardLayer::builder()
            .drain(&drain)
            .on_end(move |_| {
                ended.fetch_add(1, Ordering::Relaxed);
                *last_end.lock().unwrap() = Some(Instant::now());
            })
            .build()
            .expect("valid configuration")
    };
    let mut guarded = guard.layer(service_fn(respond));
    let kept = open(&mut guarded, n).await;
    let grace = Duration::from_millis(500);
    let drain_deadline = Instant::now() + grace;
    let report = drain.start(grace).await;
    let last = last_end.lock().unwrap().expect("events");
    let drain_after = last.saturating_duration_since(drain_deadline);
    assert_eq!(ended.load(Ordering::Relaxed), n);
    drop(kept);

    let per_stream = |bytes: u64| bytes as f64 / n as f64;
    println!("scale: {n} idle streams, one guard, timer resolution 10 ms");
    println!(
        "  open {n} guarded streams:            {:>8.1} ms ({:.0} ns per stream)",
        open_time.as_secs_f64() * 1e3,
        open_time.as_nanos() as f64 / n as f64
    );
    println!(
        "  heap per bare stream:                {:>8.0} B",
        bare_heap as f64 / n as f64
    );
    println!(
        "  heap per guarded stream:             {:>8.0} B",
        guarded_heap as f64 / n as f64
    );
    println!(
        "  guard's extra heap per stream:       {:>8.0} B",
        (guarded_heap - bare_heap) as f64 / n as f64
    );
    println!(
        "  RSS per bare / guarded stream:       {:>8.0} B / {:.0} B",
        per_stream(bare_bytes),
        per_stream(guarded_bytes)
    );
    println!(
        "  CPU while all idle, over 1 s:        {idle_cpu_ms:>8} ms (one timer task, 100 ticks/s)"
    );
    println!(
        "  runtime wake-ups while all idle, 1 s: {idle_parks:>8} (worker parks; the timer ticks 100/s)"
    );
    println!(
        "  stream wake-ups while all idle, 1 s:  {idle_wakes:>8} (bodies polled once, then idle)"
    );
    println!("  stream wake-ups when they ended:      {end_wakes:>8} (one per stream: its end)");
    println!(
        "  last end after the last deadline:    {:>8.1} ms (lifetime)",
        after_deadline.as_secs_f64() * 1e3
    );
    println!(
        "  last end after the drain's deadline: {:>8.1} ms ({} cut)",
        drain_after.as_secs_f64() * 1e3,
        report.cut()
    );
}
