//! A cap flood must not become a log flood: per-stream refusals are `DEBUG`,
//! with at most one `WARN` summary per guard per second.

use std::{
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::StatusCode;
use tower::Layer;
use tracing_subscriber::fmt::MakeWriter;

#[path = "support/paused.rs"]
mod paused;
use paused::{App, call, guard, request};
use tower_stream_guard::StreamGuardLayer;

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
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_refusals_log_a_bounded_number_of_info_lines() {
    const REFUSALS: usize = 10_000;
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let guard = guard(StreamGuardLayer::builder().max_streams_per_connection(1));
    let (app, _feeders) = App::new();
    let mut svc = guard.layer(app.service());
    let _held = call(&mut svc, request("/a", 1, false)).await;
    // 10,000 refusals over ten seconds of (paused) time.
    for _ in 0..REFUSALS {
        let refused = call(&mut svc, request("/a", 1, false)).await;
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    let lines = captured.lines();
    eprintln!(
        "{} INFO+ lines for {REFUSALS} refusals; first: {:?}",
        lines.len(),
        lines.first()
    );
    // At most one summary a second, plus the first refusal's at once.
    assert!(
        lines.len() <= 12,
        "{} INFO+ lines for {REFUSALS} refusals",
        lines.len()
    );
    assert!(!lines.is_empty(), "the refusals are reported");
    assert!(
        lines
            .iter()
            .all(|line| line.contains("WARN") && line.contains("max_streams_per_connection")),
        "{lines:?}"
    );
    // The summaries count every refusal but those of the last second.
    let counted: usize = lines
        .iter()
        .filter_map(|line| {
            line.split(" streams refused")
                .next()?
                .rsplit(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(
        counted > REFUSALS - 1_100 && counted <= REFUSALS,
        "{counted}"
    );
}
