//! The log lines operators rely on: `INFO` for a guard-made end and `DEBUG`
//! for the others (with `stream_id`, `route`, `reason` and `duration_ms`),
//! `ERROR` when ending a stream panicked in the timer (a panicking tracing
//! layer: the timer goes on), `WARN` when no runtime can run a timer.

#[path = "support/paused.rs"]
mod paused;

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use paused::{App, SECOND, TICK, call, guard, next_event, request};
use tower::Layer;
use tower_stream_guard::{
    ConnectionGuard, EndReason, IdleDirection, StreamGuardLayer, connection::PeerOf,
};
use tracing_subscriber::{Layer as _, fmt::MakeWriter, layer::SubscriberExt};

/// Every line the subscriber writes, kept for the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The one line holding `message`.
    fn line(&self, message: &str) -> String {
        let lines = self.lines();
        let found: Vec<_> = lines.iter().filter(|l| l.contains(message)).collect();
        assert_eq!(found.len(), 1, "one {message:?} line in {lines:#?}");
        found[0].clone()
    }
}

fn fmt_layer<S>(captured: &Captured) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_filter(tracing_subscriber::filter::LevelFilter::DEBUG)
}

fn assert_end_fields(line: &str, route: &str, reason: &str) {
    for field in [
        "stream_id=".to_owned(),
        format!("route=\"{route}\""),
        format!("reason=\"{reason}\""),
        "duration_ms=".to_owned(),
    ] {
        assert!(line.contains(&field), "{field} missing in {line}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_guard_made_end_logs_info_and_other_ends_debug_with_their_fields() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(fmt_layer(&captured));
    let _default = tracing::subscriber::set_default(subscriber);
    let guard = guard(StreamGuardLayer::builder().response_idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let _idle = call(&mut svc, request("/idle", 1, false)).await;
    let _idle_feed = feeders.recv().await.unwrap();
    let ended = next_event(&mut events).await;
    assert_eq!(
        ended.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    let info = captured.line("stream ended by guard: ");
    assert!(info.contains(" INFO "), "{info}");
    assert!(info.contains("tower_stream_guard"), "{info}");
    assert!(info.contains(&ended.reason().to_string()), "{info}");
    assert_end_fields(&info, "/idle", ended.reason().as_str());
    assert!(
        info.contains(&format!("stream_id={}", ended.id().get())),
        "{info}"
    );
    assert!(info.contains("duration_ms=1000"), "{info}");

    let done = call(&mut svc, request("/done", 1, false)).await;
    drop(feeders.recv().await.unwrap());
    drop(done);
    let ended = next_event(&mut events).await;
    assert_eq!(ended.reason(), EndReason::Cancelled);
    let debug = captured.line("stream ended stream_id=");
    assert!(debug.contains(" DEBUG "), "{debug}");
    assert_end_fields(&debug, "/done", ended.reason().as_str());
}

/// A layer that panics on the first guard-made end line it sees.
struct PanicsOnFirstGuardEnd(Arc<AtomicBool>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PanicsOnFirstGuardEnd {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut message = String::new();
        event.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                if field.name() == "message" {
                    message = format!("{value:?}");
                }
            },
        );
        if message.starts_with("stream ended by guard") && !self.0.swap(true, Ordering::SeqCst) {
            panic!("a tracing layer panics on the end line");
        }
    }
}

/// A tracing layer panics while the timer ends a stream: the timer logs
/// `ERROR` and goes on; the other stream due in the same tick still ends,
/// and a later stream is still timed out, with its event.
#[tokio::test(start_paused = true)]
async fn a_tracing_layer_that_panics_on_an_end_leaves_the_timer_running() {
    let captured = Captured::default();
    let panicked = Arc::new(AtomicBool::new(false));
    let subscriber = tracing_subscriber::registry()
        .with(PanicsOnFirstGuardEnd(Arc::clone(&panicked)))
        .with(fmt_layer(&captured));
    let _default = tracing::subscriber::set_default(subscriber);
    let guard = guard(StreamGuardLayer::builder().response_idle_timeout(SECOND));
    let mut events = guard.subscribe();
    let (app, mut feeders) = App::new();
    let mut svc = guard.layer(app.service());

    let _first = call(&mut svc, request("/a", 1, false)).await;
    let _first_feed = feeders.recv().await.unwrap();
    let first = app.last_handle().unwrap();
    let _second = call(&mut svc, request("/a", 1, false)).await;
    let _second_feed = feeders.recv().await.unwrap();
    let second = app.last_handle().unwrap();
    // Both due in the same tick; the first end panics in the layer. Each
    // still has its one event, and is counted ended, not active.
    let mut ended = [next_event(&mut events).await, next_event(&mut events).await].map(|e| e.id());
    ended.sort();
    assert!(panicked.load(Ordering::SeqCst), "the layer panicked");
    assert!(first.is_ended() && second.is_ended(), "both streams ended");
    assert_eq!(ended, [first.id(), second.id()]);
    assert_eq!(
        guard.stats().active(),
        0,
        "the panicked end left a stream active"
    );
    assert_eq!(guard.stats().ended_total(), 2);
    let error = captured.line("ending a stream panicked; the timer goes on");
    assert!(error.contains(" ERROR "), "{error}");
    assert!(error.contains("stream_id="), "{error}");

    // A stream started afterwards is still timed out, with one event.
    tokio::time::sleep(SECOND).await;
    let _third = call(&mut svc, request("/b", 1, false)).await;
    let _third_feed = feeders.recv().await.unwrap();
    let third = app.last_handle().unwrap();
    let started = tokio::time::Instant::now();
    let ended = next_event(&mut events).await;
    assert_eq!(ended.id(), third.id());
    assert_eq!(
        ended.reason(),
        EndReason::IdleTimeout(IdleDirection::Response)
    );
    assert!(
        started.elapsed() <= SECOND + TICK,
        "{:?}",
        started.elapsed()
    );
    assert!(events.try_recv().is_err(), "one event");
    assert_eq!(guard.stats().active(), 0);
}

struct NoSocket;

impl PeerOf for NoSocket {
    fn peer(&self) -> Option<SocketAddr> {
        None
    }
}

/// Outside any runtime, a connection guard that needs a timer cannot start
/// one: it says so once, at `WARN`.
#[test]
fn wrapping_without_a_runtime_warns_once() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(fmt_layer(&captured));
    let _default = tracing::subscriber::set_default(subscriber);
    let connections = ConnectionGuard::builder()
        .idle_timeout(60 * SECOND)
        .build()
        .expect("valid configuration");
    let first = connections.wrap(NoSocket);
    drop(first);
    let _second = connections.wrap(NoSocket);
    let warn = captured.line("no tokio runtime when a connection was wrapped");
    assert!(warn.contains(" WARN "), "{warn}");
    assert!(warn.contains("tower_stream_guard"), "{warn}");
}
